"""TokenAdvantageLogger in real `sdlit fit` runs on the tiny model: region metrics logged, records saved."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from sdlit.analysis import RegionStats, read_records
from sdlit.callbacks import TokenAdvantageLogger
from sdlit.cli import main, run_cli
from sdlit.critics import ArithmeticStepCritic
from sdlit.rollout import Rollout
from sdlit.tasks.base import Problem

from conftest import REPO_ROOT, build_tokenizer, write_config


def fit_with_logger(tmp_path, model_dir, feedback, **logger_args):
    logger = {"class_path": "TokenAdvantageLogger", "init_args": logger_args}
    config = write_config(tmp_path, model_dir, callbacks=[feedback, logger])
    cli = run_cli(["fit", "--config", config])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, TokenAdvantageLogger))
    return cli, callback


def test_logger_saves_records_and_logs_the_same_statistics(tmp_path, tiny_model_dir):
    cli, callback = fit_with_logger(tmp_path, tiny_model_dir, "StepCritique", max_records_per_step=8)
    assert callback.path == tmp_path / "token_advantages.jsonl"  # no logger: the default_root_dir
    records = read_records(callback.path)
    assert sorted({r.step for r in records}) == [0, 1]
    assert all(len([r for r in records if r.step == s]) == 2 for s in (0, 1))  # batch_size 2, all saved
    metrics = cli.trainer.callback_metrics
    last = [r for r in records if r.step == 1]
    stats = RegionStats()
    for record in last:
        assert len(record.tokens) == len(record.advantages) and all(math.isfinite(a) for a in record.advantages)
        assert record.condition in ("StepCritique", "reference (critic fallback)")
        stats.add(record.advantages, record.step_spans, record.first_error)
    summary = stats.summary()
    assert summary, "no region had tokens"
    for region, values in summary.items():  # the last step's logged values are those of its records
        assert float(metrics[f"advantage/{region}_mean"]) == pytest.approx(values["mean"], abs=1e-5)
        assert float(metrics[f"advantage/{region}_abs"]) == pytest.approx(values["mean_abs"], abs=1e-5)
        assert float(metrics[f"advantage/{region}_neg_frac"]) == pytest.approx(values["neg_frac"])
    # and, pooled over regions, they match the module's own train/advantage over the same tokens
    tokens = sum(len(r.advantages) for r in last)
    pooled = sum(sum(r.advantages) for r in last) / tokens
    assert float(metrics["train/advantage"]) == pytest.approx(pooled, abs=1e-5)


def test_logger_every_n_steps_caps_records_and_locates_errors_with_a_critic(tmp_path, tiny_model_dir):
    path = tmp_path / "sub" / "adv.jsonl"
    critic = {"class_path": "sdlit.critics.ArithmeticStepCritic"}
    cli, callback = fit_with_logger(tmp_path, tiny_model_dir, "ReferenceSolution", every_n_steps=2,
                                    max_records_per_step=1, path=str(path), critic=critic)
    assert isinstance(callback.critic, ArithmeticStepCritic)
    records = read_records(path)
    assert [r.step for r in records] == [0]  # steps 0 and 1 ran; every 2nd step logs; one record per step
    assert records[0].condition == "ReferenceSolution"
    assert records[0].case is not None  # the critic judged the rollout that the feedback did not
    # the saved records draw: sdlit analyze on them writes a figure
    main(["analyze", "--records", str(path), "--output_dir", str(tmp_path / "figs")])
    assert len(list((tmp_path / "figs").glob("*.png"))) == 1


def test_fragment_adds_the_logger(tmp_path):
    fragment = yaml.safe_load(open(REPO_ROOT / "callbacks/TokenAdvantageLogger.yaml"))
    (entry,) = fragment["trainer"]["callbacks+"]
    assert entry["class_path"] == "sdlit.callbacks.TokenAdvantageLogger"
    with pytest.raises(ValueError, match="every_n_steps must be at least 1"):
        TokenAdvantageLogger(every_n_steps=0)


def test_non_finite_advantages_are_left_out_and_counted(tmp_path):
    """A step whose log-probs hold NaN (the step guard skips it) leaves the records readable."""
    class Stub:  # what the callback reads of the trainer and module
        global_step, world_size, is_global_zero, callbacks = 0, 1, True, []
        log_dir, default_root_dir = None, str(tmp_path)
        device = torch.device("cpu")

        def __init__(self):
            self.logged = {}

        def log(self, name, value, **kwargs):
            self.logged[name] = value

    stub = Stub()
    stub.tokenizer = build_tokenizer()
    ids = stub.tokenizer("Step 1: 2 + 2 = 4\nAnswer: 4", add_special_tokens=False)["input_ids"]
    rollouts = [Rollout(Problem("q", "2 + 2 = 4\n#### 4", "4", f"p/{i}"), [1], ids, "Step 1: 2 + 2 = 4\nAnswer: 4")
                for i in range(2)]
    teacher = torch.zeros(2, len(ids))
    teacher[1, 3] = float("nan")
    stub.last_token_logprobs = {"teacher": teacher, "student": torch.full((2, len(ids)), -1.0),
                                "mask": torch.ones(2, len(ids), dtype=torch.bool)}
    callback = TokenAdvantageLogger(max_records_per_step=4)
    callback.setup(stub, stub, "fit")
    callback.on_train_batch_start(stub, stub, rollouts, 0)
    callback.on_train_batch_end(stub, stub, None, rollouts, 0)
    assert stub.logged["advantage/skipped_rollouts"] == 1.0
    assert stub.logged["advantage/all_mean"] == pytest.approx(1.0)
    assert [r.problem_id for r in read_records(tmp_path / "token_advantages.jsonl")] == ["p/0"]
