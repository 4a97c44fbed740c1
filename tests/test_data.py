"""RolloutDataModule: online sampling with feedback, offline annotated rollouts, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from sdlit.cli import run_cli
from sdlit.data import RolloutDataModule, read_offline_rollouts
from sdlit.tasks.base import DataError
from sdlit.tasks.gsm8k import GSM8K

from conftest import write_config

ROW = {
    "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "solution": "He has 3+4=<<3+4=7>>7 apples.\n#### 7",
    "answer": "7",
    "response": "Step 1: 3 + 4 = 8\nAnswer: 8",
    "context": "Step 1 is wrong: 3 + 4 is 7, not 8.",
    "reward": 0.0,
}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_offline_rollouts_train_end_to_end(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rollouts.jsonl", [ROW, {**ROW, "context": "Use 3 + 4 = 7.", "reward": 1.0}] * 2)
    config = write_config(tmp_path, tiny_model_dir, callbacks=[])
    cfg = yaml.safe_load(open(config))
    cfg["data"]["init_args"]["offline_path"] = data
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump(cfg))
    cli = run_cli(["fit", "--config", str(tmp_path / "offline.yaml")])
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert float(cli.trainer.callback_metrics["train/reward"]) == pytest.approx(0.5)
    assert float(cli.trainer.callback_metrics["train/accuracy"]) == 0.0  # "Answer: 8" is graded wrong


def test_offline_malformed_row_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROW, "{not json", ROW])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: malformed JSON"):
        read_offline_rollouts(path)


def test_offline_missing_field_names_file_row_and_field(tmp_path):
    row = dict(ROW)
    del row["response"]
    path = write_jsonl(tmp_path / "missing.jsonl", [ROW, ROW, row])
    with pytest.raises(DataError, match=r"missing\.jsonl: row 3: field 'response' is missing or empty"):
        read_offline_rollouts(path)


def test_offline_parquet_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rollouts.parquet"
    pq.write_table(pa.Table.from_pylist([ROW, ROW]), path)
    assert read_offline_rollouts(str(path))[1]["context"] == ROW["context"]


def test_gsm8k_malformed_row_fails_when_the_datamodule_loads_it(tmp_path):
    good = {"question": "q?", "answer": "1+1=<<1+1=2>>2\n#### 2"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, {"question": "no answer"}])
    module = RolloutDataModule(task=GSM8K(train_path=path, eval_path=path))
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: field 'answer' is missing or empty"):
        module.train_dataloader()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="data.rollouts_per_problem must be at least 1"):
        RolloutDataModule(rollouts_per_problem=0)


def test_online_batches_are_sampled_graded_and_annotated(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, objective="hybrid",
                          callbacks=["BinaryReward", "StepCritique"], rollouts_per_problem=3)
    cli = run_cli(["fit", "--config", config, "--trainer.max_steps", "1"])
    datamodule, module = cli.datamodule, cli.model
    problems = datamodule.task.train_problems()[:2]
    datamodule.trainer.training = True
    rollouts = datamodule.on_after_batch_transfer(problems, 0)
    assert len(rollouts) == 6 and [r.group for r in rollouts] == [0, 0, 0, 1, 1, 1]
    assert all(r.policy_version == module.global_step == 1 for r in rollouts)
    assert all(r.reward in (0.0, 1.0) and r.correct is not None for r in rollouts)
    assert all(r.context and r.feedback["case"] in ("correct", "missing_step", "incomplete", "wrong") for r in rollouts)
    decoded = module.tokenizer.decode(rollouts[0].response_ids, skip_special_tokens=True)
    assert decoded == rollouts[0].response
