"""Bad input, one test per kind: a clear message naming where it came from, or a counted fallback.

Also the safety rules: remote model code stays off unless asked for, and checkpoints load with
``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from sdlit.cli import run_cli
from sdlit.data import RolloutDataModule, read_offline_rollouts
from sdlit.models import ModelLoadError, load_model, load_tokenizer
from sdlit.settings import EvalSettings, SamplingSettings
from sdlit.tasks.arith import Arith
from sdlit.tasks.base import DataError
from sdlit.tasks.gsm8k import GSM8K, read_problems

GOOD = {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
OFFLINE = {"question": "1 + 2?", "solution": "1 + 2 = 3\n#### 3", "answer": "3", "response": "Step 1: 3\nAnswer: 3"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---- rows of data files ----------------------------------------------------------------------------
def test_malformed_jsonl_row_fails_naming_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "rollouts.jsonl", [OFFLINE, '{"question": "2 + 2?" "solution": "4"}', OFFLINE])
    with pytest.raises(DataError) as err:
        read_offline_rollouts(path)
    assert str(err.value) == f"{path}: row 2: malformed JSON (Expecting ',' delimiter at column 23)"


def test_malformed_row_is_skipped_and_counted_when_set(tmp_path, caplog):
    path = write_jsonl(tmp_path / "rollouts.jsonl", [OFFLINE, "not json", {**OFFLINE, "response": ""}, OFFLINE])
    data = RolloutDataModule(offline_path=path, on_bad_row="skip", batch_size=1)
    with caplog.at_level(logging.WARNING):
        loader = data.train_dataloader()
    assert len(loader.dataset) == 2 and data.skipped_rows == 2
    assert f"{path}: skipped 2 bad rows, kept 2 rollouts" in caplog.text
    assert f"{path}: row 2: malformed JSON" in caplog.text and f"{path}: row 3: field 'response'" in caplog.text
    with pytest.raises(ValueError, match="data.on_bad_row must be 'error' or 'skip', got 'ignore'"):
        RolloutDataModule(on_bad_row="ignore")


def test_parquet_row_with_a_missing_field_names_file_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rollouts.parquet"
    pq.write_table(pa.Table.from_pylist([OFFLINE, {**OFFLINE, "solution": None}]), path)
    with pytest.raises(DataError) as err:
        read_offline_rollouts(str(path))
    assert str(err.value) == f"{path}: row 2: field 'solution' is missing or empty"


@pytest.mark.parametrize("field", ["question", "answer"])
def test_missing_question_or_answer_names_the_field(tmp_path, field):
    row = {k: v for k, v in GOOD.items() if k != field}
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError) as err:
        read_problems(path)
    assert str(err.value) == f"{path}: row 3: field '{field}' is missing or empty"


def test_gold_answer_that_is_not_a_number(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {**GOOD, "answer": "3 + 4 = 7\n#### seven"}])
    with pytest.raises(DataError) as err:
        GSM8K(train_path=path).train_problems()
    assert str(err.value) == (
        f"{path}: row 2: field 'answer': gold answer is not a number (expected a last line '#### <number>')"
    )


def test_empty_dataset_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError) as err:
        GSM8K(train_path=str(path)).train_problems()
    assert str(err.value) == f"{path}: no problems: the file or split is empty"


def test_empty_split():
    with pytest.raises(DataError) as err:
        RolloutDataModule(task=Arith(train_size=0)).train_dataloader()
    assert str(err.value) == "the training split of task 'arith' is empty"
    with pytest.raises(DataError) as err:
        RolloutDataModule(task=Arith(eval_size=0)).val_dataloader()
    with pytest.raises(ValueError, match="evaluation num_problems must be at least 1"):
        EvalSettings(num_problems=0)
    assert str(err.value) == "the held-out split of task 'arith' is empty"


# ---- settings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["no-such-model", "/no/such/dir"])
def test_unknown_model_alias_or_path(name):
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(name)
    message = str(err.value)
    assert message.startswith(f"cannot load model {name!r}: it is not a packaged alias (smollm2-135m-instruct), "
                              "not a local model directory, and loading it as a Hugging Face id failed")


def test_yaml_with_a_wrong_type_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learning_rate: fast\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "fast" in err


def test_yaml_with_an_unknown_key_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    batch_sise: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code == 2
    assert "batch_sise" in capsys.readouterr().err


# ---- during training: counted fallbacks -------------------------------------------------------------
class HalfBrokenCritic:
    """A critic whose batch call always fails and whose single calls fail every other time."""

    def __init__(self):
        self.calls = 0

    def critique(self, question, reference, response):
        from sdlit.critics import ArithmeticStepCritic

        self.calls += 1
        if self.calls % 2:
            raise ConnectionError("critic service unreachable")
        return ArithmeticStepCritic().critique(question, reference, response)

    def critique_batch(self, items):
        raise ConnectionError("critic service unreachable")


class KeepRollouts(Callback):
    """Keeps every training batch of rollouts."""

    def __init__(self):
        self.rollouts = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rollouts.extend(batch)


@pytest.fixture(scope="module")
def critique_fit(tmp_path_factory, tiny_model_dir):
    """Two steps with a flaky critic and a teacher window too small for the critiques."""
    from sdlit.callbacks import StepCritique
    from sdlit.cli import SdlitCLI
    from sdlit.module import SelfDistillationModule

    folder = tmp_path_factory.mktemp("critique-fit")
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "default_root_dir": str(folder)},
        "model": {"class_path": "sdlit.module.SelfDistillationModule",
                  "init_args": {"model": tiny_model_dir, "learning_rate": 0.01, "lora": {"r": 4, "alpha": 8},
                                "max_teacher_length": 560}},
        "data": {"class_path": "sdlit.data.RolloutDataModule",
                 "init_args": {"task": {"class_path": "sdlit.tasks.arith.Arith", "init_args": {"train_size": 8}},
                               "batch_size": 4, "sampling": {"max_new_tokens": 12}}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    kept, feedback = KeepRollouts(), StepCritique(critic=HalfBrokenCritic())
    cli = SdlitCLI(SelfDistillationModule, RolloutDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   trainer_defaults={"callbacks": [feedback, kept]}, args=["--config", str(path)], run=False,
                   save_config_callback=None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, feedback, kept.rollouts


def lora_moved(cli) -> bool:
    return any(p.abs().sum() > 0 for n, p in cli.model.model.named_parameters() if "lora_B" in n)


def test_teacher_context_longer_than_the_window_is_cut_and_counted(critique_fit):
    cli, feedback, rollouts = critique_fit
    assert cli.model.truncations > 0
    assert float(cli.trainer.callback_metrics["train/truncations"]) > 0
    # the response is never cut: every teacher input fits the window with the whole response
    batch, has_context, truncated = cli.model.teacher_batch(rollouts[:4])
    assert truncated > 0 and batch.input_ids.shape[1] <= 560
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"])) and lora_moved(cli)


def test_response_without_step_tags_is_critiqued_and_still_trained(critique_fit):
    cli, feedback, rollouts = critique_fit
    critiqued = [r for r in rollouts if "critic_fallback" not in r.feedback]
    assert critiqued, "no rollout was critiqued"
    for rollout in critiqued:
        assert "Step" not in rollout.response  # a random tiny model writes no step tags
        assert rollout.context.startswith("The answer had no step tags, so each line was read as one step.")
    assert lora_moved(cli), "rollouts without step tags were not trained on"


def test_critic_exception_falls_back_and_is_counted(critique_fit):
    cli, feedback, rollouts = critique_fit
    fallen = [r for r in rollouts if r.feedback.get("critic_fallback") == "reference"]
    assert len(fallen) == feedback.failures == feedback.fallbacks == 4  # every other of 8 rollouts
    assert float(cli.trainer.callback_metrics["critic/failures"]) == 4.0
    from sdlit.tasks.solutions import clean_solution

    assert all(r.context == clean_solution(r.problem.solution) for r in fallen)  # the reference solution


# ---- safety -----------------------------------------------------------------------------------------
REMOTE_CODE = '''
import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text("yes")
from transformers import LlamaForCausalLM

class RemoteLlama(LlamaForCausalLM):
    pass
'''


def test_remote_model_code_runs_only_when_trusted(tmp_path, tiny_model_dir):
    folder = tmp_path / "remote-code-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_remote.RemoteLlama"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_remote.py").write_text(REMOTE_CODE)
    model = load_model(str(folder))  # the default: the library's own Llama class, the file never imported
    assert type(model).__name__ == "LlamaForCausalLM" and not (folder / "REMOTE_CODE_RAN").exists()
    trusted = load_model(str(folder), trust_remote_code=True)
    assert type(trusted).__name__ == "RemoteLlama"


@pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict but not in the checkpoint")
def test_python_api_checkpoint_loads_weights_only(tmp_path, tiny_model_dir):
    from lightning.pytorch import Trainer

    from sdlit.callbacks import ReferenceSolution
    from sdlit.checkpointing import AtomicCheckpointIO
    from sdlit.module import SelfDistillationModule

    module = SelfDistillationModule(model=tiny_model_dir, learning_rate=0.01)  # lora: a LoraSettings object
    data = RolloutDataModule(task=Arith(train_size=4, eval_size=2), batch_size=2,
                             sampling=SamplingSettings(max_new_tokens=4))
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[ReferenceSolution()],
                      plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(module, data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0,
                                                       "target_modules": "all-linear"}
    assert not checkpoint["hyper_parameters"]["trust_remote_code"]
    loaded = SelfDistillationModule.load_from_checkpoint(path, weights_only=True)
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert loaded.lora.r == 16
    assert all(torch.equal(p, dict(loaded.model.named_parameters())[n]) for n, p in trained.items())
