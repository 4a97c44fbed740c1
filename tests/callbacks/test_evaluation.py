"""AvgAtKEvaluation: scheduled held-out evaluation in fit, `sdlit validate`, the samples table, settings."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sdlit.cli import run_cli
from sdlit.data import RolloutDataModule
from sdlit.settings import EvalSettings, SamplingSettings

from conftest import write_config
from feedback_examples import PARITY_TASK, ParityArith


def evaluation(**init_args):
    return {"class_path": "sdlit.callbacks.AvgAtKEvaluation", "init_args": {"console_problems": 2, **init_args}}


def config_with(tmp_path, model_dir, callbacks, max_steps=2, task=PARITY_TASK, evaluation_settings=None, **extra):
    path = write_config(tmp_path, model_dir, callbacks=["ReferenceSolution", *callbacks], extra_trainer={
        "max_steps": max_steps, "limit_val_batches": None, "log_every_n_steps": 1,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(tmp_path / "logs")}},
        **extra,
    })
    config = yaml.safe_load(Path(path).read_text())
    config["data"]["init_args"].update(task=task)
    config["data"]["init_args"]["evaluation"].update(num_problems=5, **(evaluation_settings or {}))
    Path(path).write_text(yaml.safe_dump(config))
    return path


def metric_rows(tmp_path, name):
    path = next((tmp_path / "logs").rglob("metrics.csv"))
    return [row for row in csv.DictReader(open(path)) if row.get(name)]


def read_samples(path):
    rows = list(csv.DictReader(open(path)))
    by_problem: dict[str, list[dict]] = {}
    for row in rows:
        by_problem.setdefault(row["problem"], []).append(row)
    return by_problem


def reference_scores(by_problem, k):
    """Avg@k, Pass@k (n == k: any correct), Maj@k and mean length, recomputed from a samples CSV."""
    avg, passed, maj, lengths = [], [], [], []
    for rows in by_problem.values():
        correct = [row["correct"] == "True" for row in rows]
        answers = [row["extracted"] or None for row in rows]
        avg.append(sum(correct) / len(correct))
        passed.append(float(any(correct)))
        votes = Counter(a for a in answers[:k] if a is not None)
        if votes:
            top = max(votes.values())
            winner = next(a for a in answers[:k] if a is not None and votes[a] == top)
            maj.append(float(correct[answers.index(winner)]))
        else:
            maj.append(0.0)
        lengths += [int(row["tokens"]) for row in rows]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"avg": mean(avg), "pass": mean(passed), "maj": mean(maj), "mean_length": mean(lengths)}


def test_fit_evaluates_every_two_steps_and_at_the_end(tmp_path, tiny_model_dir, capsys):
    # data.evaluation.k=2; 5 steps: evaluations after steps 2, 4 and 5 (at_end)
    config = config_with(tmp_path, tiny_model_dir, [evaluation(every_n_steps=2)], max_steps=5,
                         evaluation_settings={"k": 2, "max_new_tokens": 10})
    cli = run_cli(["fit", "--config", config])
    assert cli.datamodule.evaluation.k == 2 and cli.datamodule.evaluation.max_new_tokens == 10
    rows = metric_rows(tmp_path, "val/avg@2")
    # Lightning writes the metrics of optimizer step N on the row with step N - 1 (train rows too)
    assert [int(r["step"]) for r in rows] == [1, 3, 4]
    assert not metric_rows(tmp_path, "val/avg@3")
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "AvgAtKEvaluation")
    assert [p.name for p in callback.written] == ["val_step000002.csv", "val_step000004.csv", "val_step000005.csv"]
    for path, row in zip(callback.written, rows, strict=True):
        by_problem = read_samples(path)
        assert len(by_problem) == 5 and all(len(samples) == 2 for samples in by_problem.values())
        task = ParityArith()
        for samples in by_problem.values():
            for s in samples:
                assert s["correct"] == str(task.is_correct(s["response"], s["gold"]))
                assert (s["extracted"] or None) == task.extract_answer(s["response"])
                assert 0 < int(s["tokens"]) <= 10
        expected = reference_scores(by_problem, 2)
        for name in ("avg", "pass", "maj"):
            assert float(row[f"val/{name}@2"]) == pytest.approx(expected[name], abs=1e-6), name
        assert float(row["val/mean_length"]) == pytest.approx(expected["mean_length"], abs=1e-5)
    out = capsys.readouterr().out
    assert "val at step 2" in out and "val at step 5" in out and "majority" in out


def test_validate_writes_four_metrics_and_samples_with_tensorboard(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_with(tmp_path, tiny_model_dir, [evaluation()])
    tb_dir = tmp_path / "tb"
    cli = run_cli(["validate", "--config", config, "--trainer.logger+=TensorBoardLogger",
                   "--trainer.logger.save_dir", str(tb_dir)])
    metrics = cli.trainer.callback_metrics
    assert {"val/avg@3", "val/pass@3", "val/maj@3", "val/mean_length"} <= set(metrics)
    (row,) = metric_rows(tmp_path, "val/avg@3")
    samples_csv = next((tmp_path / "logs").rglob("samples/val_step000000.csv"))
    expected = reference_scores(read_samples(samples_csv), 3)
    for name in ("avg", "pass", "maj"):
        assert float(row[f"val/{name}@3"]) == pytest.approx(expected[name], abs=1e-6)
    assert float(row["val/mean_length"]) == pytest.approx(expected["mean_length"], abs=1e-5)
    events = EventAccumulator(str(next(tb_dir.rglob("events.out.*")).parent), size_guidance={"tensors": 0})
    events.Reload()
    assert "val/samples/text_summary" in events.Tags()["tensors"]


def test_fit_end_evaluation_equals_validate_of_the_saved_checkpoint(tmp_path, tiny_model_dir):
    # greedy held-out samples are deterministic: the evaluation at the end of fit and `sdlit validate
    # --ckpt_path last.ckpt` afterwards must give the same four numbers
    callbacks = [evaluation(every_n_steps=None)]
    config = config_with(tmp_path, tiny_model_dir, callbacks, max_steps=3, enable_checkpointing=True,
                         evaluation_settings={"temperature": 0.0})
    cli = run_cli(["fit", "--config", config])
    in_fit = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    assert len(in_fit) == 4
    saved = cli.trainer.checkpoint_callback.best_model_path  # saved after the final evaluation, at step 3
    assert saved.endswith("step=3.ckpt")
    validated = run_cli(["validate", "--config", config, "--ckpt_path", saved]).trainer.callback_metrics
    for name, value in in_fit.items():
        assert float(validated[name]) == pytest.approx(value, abs=1e-6), name


def test_checkpoint_monitor_must_match_k(tmp_path, tiny_model_dir):
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"monitor": "val/avg@12", "mode": "max"}}
    config = config_with(tmp_path, tiny_model_dir, [evaluation(), checkpoint], enable_checkpointing=True,
                         evaluation_settings={"k": 2})
    with pytest.raises(ValueError, match=r"monitors 'val/avg@12' but the evaluation samples k=2"):
        run_cli(["fit", "--config", config])


def test_bad_settings_are_clear_errors():
    from sdlit.callbacks import AvgAtKEvaluation

    with pytest.raises(ValueError, match="AvgAtKEvaluation.every_n_steps must be at least 1"):
        AvgAtKEvaluation(every_n_steps=0)
    with pytest.raises(ValueError, match="evaluation k must be at least 1"):
        EvalSettings(k=0)
    with pytest.raises(ValueError, match="evaluation temperature"):
        EvalSettings(temperature=-1.0)
    with pytest.raises(ValueError, match="sampling top_p"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(TypeError, match="data.evaluation must be a EvalSettings"):
        RolloutDataModule(evaluation={"k": 2})
