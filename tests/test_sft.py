"""The sft objective: step-tagged reference solutions as targets, cross-entropy against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from sdlit.cli import run_cli
from sdlit.sft import reference_rollouts
from sdlit.steps import split_steps
from sdlit.tasks.arith import Arith
from sdlit.tasks.base import DataError, Problem
from sdlit.tasks.solutions import tagged_solution

from conftest import write_config

GSM8K_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


def test_tagged_solution_reads_as_the_solver_format():
    text = tagged_solution(GSM8K_SOLUTION)
    assert text == ("Step 1: Natalia sold 48/2 = 24 clips in May.\n"
                    "Step 2: She sold 48+24 = 72 clips.\n"
                    "Answer: 72")
    steps = split_steps(text)
    assert [s.kind for s in steps] == ["step", "step", "answer"]
    assert steps[-1].text == "72"


def test_tagged_solution_takes_the_gold_answer_when_the_solution_has_no_final_line():
    assert tagged_solution("Add 2 and 3 to get 5.", answer="5") == "Step 1: Add 2 and 3 to get 5.\nAnswer: 5"
    with pytest.raises(DataError, match="no final answer"):
        tagged_solution("Add 2 and 3.")


def test_every_arith_solution_is_graded_correct_after_tagging():
    task = Arith(min_steps=1, max_steps=4, train_size=64)
    for problem in task.train_problems():
        text = tagged_solution(problem.solution, problem.answer)
        assert task.is_correct(text, problem.answer), text
        assert sum(s.kind == "step" for s in split_steps(text)) == problem.solution.count("\n")


def test_reference_rollouts_end_with_eos_and_decode_to_the_target():
    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    problems = [Problem("Q1?", GSM8K_SOLUTION, "72", "a"), Problem("Q2?", "1+1=2\n#### 2", "2", "b")]
    rollouts = reference_rollouts(problems, tokenizer, policy_version=3)
    assert [r.group for r in rollouts] == [0, 1]
    for r in rollouts:
        assert r.response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(r.response_ids[:-1]) == r.response
        assert r.correct and r.policy_version == 3 and r.context is None


def test_sft_step_loss_equals_cross_entropy_of_the_full_sequence(tmp_path, tiny_model_dir, monkeypatch):
    """The training step's loss sum and loss-token count equal the token-level cross-entropy sum and token count
    over the responses, computed independently on each unpadded prompt + response sequence with F.cross_entropy
    (the optimizer step divides the one by the other, see sdlit.normalization)."""
    config = write_config(tmp_path, tiny_model_dir, objective="sft", extra_trainer={"max_steps": 0})
    cli = run_cli(["fit", "--config", config])
    module = cli.model
    problems = Arith(min_steps=1, max_steps=3, train_size=3).train_problems()
    rollouts = reference_rollouts(problems, module.tokenizer)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # called outside the fit loop
    module.model.eval()  # no dropout either way; eval keeps the comparison deterministic
    loss = module.training_step(rollouts, 0)

    total, count = 0.0, 0
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        logits = module.model(input_ids=ids).logits[0].float()
        start = len(r.prompt_ids)
        targets = ids[0, start:]
        total += F.cross_entropy(logits[start - 1 : -1], targets, reduction="sum").item()
        count += len(targets)
    assert math.isclose(float(loss), total, rel_tol=1e-5)
    assert module.step_loss.count == count


def test_sft_fit_samples_nothing_and_lowers_the_loss(tmp_path, tiny_model_dir, monkeypatch):
    import sdlit.data

    def no_sampling(*args, **kwargs):
        raise AssertionError("objective sft must not sample rollouts")

    monkeypatch.setattr(sdlit.data, "sample_rollouts", no_sampling)
    config = write_config(tmp_path, tiny_model_dir, objective="sft", extra_trainer={"max_steps": 12})
    raw = yaml.safe_load(open(config))
    raw["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp_path), "name": "logs"}}
    raw["trainer"]["log_every_n_steps"] = 1
    raw["model"]["init_args"]["learning_rate"] = 0.01
    raw["data"]["init_args"]["shuffle"] = False
    raw["data"]["init_args"]["task"]["init_args"]["train_size"] = 2  # the same two problems every step
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    cli = run_cli(["fit", "--config", config])
    assert cli.trainer.global_step == 12
    import csv

    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.1, losses  # the same two targets every step: the loss must fall
    assert float(cli.trainer.callback_metrics["train/accuracy"]) == 1.0  # targets are the reference solutions
