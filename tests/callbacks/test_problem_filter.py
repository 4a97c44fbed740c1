"""ProblemBandFilter: the Avg@n band, the split files, and a real `sdlit validate` run checked against its samples."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import yaml

from sdlit.callbacks import ProblemBandFilter
from sdlit.cli import run_cli
from sdlit.tasks.base import DataError
from sdlit.tasks.gsm8k import GSM8K

from conftest import write_config


def candidate(i: int, correct: int, n: int = 8) -> dict:
    return {"id": f"arith/eval/{i}", "question": f"Q{i}: Tom has {i} apples. How many?",
            "answer": f"He has {i}.\n#### {i}", "gold": str(i), "correct": correct, "n": n}


def test_band_is_strict_and_the_split_is_readable_by_the_gsm8k_task(tmp_path):
    rows = [candidate(i, c) for i, c in enumerate([0, 1, 2, 3, 8, 1, 2, 0, 1, 2, 5, 1])]
    f = ProblemBandFilter(str(tmp_path), low=0.0, high=5 / 16, held_out=3, seed=1)
    summary = f.write(rows)
    kept = {r["id"] for r in rows if 0 < r["correct"] < 2.5}  # 1/8 and 2/8 are below 5/16; 3/8 is not
    assert summary["kept"] == len(kept) == 7 and summary["train"] == 4 and summary["held_out"] == 3
    task = GSM8K(train_path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl"))
    train, held = task.train_problems(), task.eval_problems()
    assert len(train) == 4 and len(held) == 3
    questions = {r["question"]: r for r in rows}
    assert {p.question for p in train}.isdisjoint({p.question for p in held})
    for p in train + held:
        source = questions[p.question]
        assert source["id"] in kept and p.answer == source["gold"] and p.solution == source["answer"]
    recorded = {p["id"]: p["split"] for p in json.loads((tmp_path / "filter.json").read_text())["problems"]}
    assert sum(v == "eval" for v in recorded.values()) == 3 and recorded["arith/eval/4"] is None
    again = ProblemBandFilter(str(tmp_path / "again"), held_out=3, seed=1).write(rows)
    assert again["problems"] == summary["problems"]  # the seed fixes the split


def test_validation_split_is_disjoint_from_held_out_and_train(tmp_path):
    rows = [candidate(i, 1 + i % 2) for i in range(20)] + [candidate(20 + i, 0) for i in range(5)]
    summary = ProblemBandFilter(str(tmp_path), held_out=6, validation=4, seed=2).write(rows)
    assert (summary["kept"], summary["held_out"], summary["validation"], summary["train"]) == (20, 6, 4, 10)
    task = GSM8K(train_path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "validation.jsonl"))
    validation = {p.question for p in task.eval_problems()}
    held = {p.question for p in GSM8K(train_path=str(tmp_path / "train.jsonl"),
                                      eval_path=str(tmp_path / "eval.jsonl")).eval_problems()}
    train = {p.question for p in task.train_problems()}
    assert len(validation) == 4 and len(held) == 6 and len(train) == 10
    assert validation.isdisjoint(held) and validation.isdisjoint(train) and held.isdisjoint(train)
    recorded = Counter(p["split"] for p in json.loads((tmp_path / "filter.json").read_text())["problems"])
    assert recorded == {"train": 10, "eval": 6, "validation": 4, None: 5}
    with pytest.raises(DataError, match=r"not more than held_out \+ validation = 20"):
        ProblemBandFilter(str(tmp_path / "x"), held_out=16, validation=4).write(rows)
    with pytest.raises(ValueError, match="validation must be at least 0"):
        ProblemBandFilter(str(tmp_path), validation=-1)
    assert not (tmp_path / "x").exists()


def test_too_few_problems_in_the_band_is_a_clear_error(tmp_path):
    rows = [candidate(i, c) for i, c in enumerate([0, 8, 1])]
    with pytest.raises(DataError, match=r"only 1 of 3 candidate problems have Avg@n in \(0, 0.3125\)"):
        ProblemBandFilter(str(tmp_path), held_out=1).write(rows)
    with pytest.raises(ValueError, match="low < high"):
        ProblemBandFilter(str(tmp_path), low=0.5, high=0.5)


def test_validate_writes_the_band_from_the_samples_it_drew(tmp_path, tiny_model_dir):
    """A real `sdlit validate`: each candidate's recorded count of correct samples equals the count in the
    samples CSV that AvgAtKEvaluation wrote from the same validation loop."""
    config = write_config(tmp_path, tiny_model_dir, extra_trainer={"limit_val_batches": None})
    raw = yaml.safe_load(open(config))
    raw["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp_path), "name": "logs", "version": 0}}
    split = tmp_path / "split"
    raw["trainer"]["callbacks"] = [
        {"class_path": "sdlit.callbacks.AvgAtKEvaluation", "init_args": {"console_problems": 0}},
        {"class_path": "sdlit.callbacks.ProblemBandFilter",
         "init_args": {"output_dir": str(split), "low": 0.0, "high": 1.0, "held_out": 1}},
    ]
    data = raw["data"]["init_args"]
    data["task"] = {"class_path": "feedback_examples.ParityArith", "init_args": {"eval_size": 8}}
    data["evaluation"] = {"k": 4, "num_problems": 8, "batch_size": 3, "max_new_tokens": 6}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    run_cli(["validate", "--config", config])

    summary = json.loads((split / "filter.json").read_text())
    samples = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "samples" / "val_step000000.csv")))
    counted = Counter(r["problem"] for r in samples if r["correct"] == "True")
    assert summary["candidates"] == 8
    for problem in summary["problems"]:
        assert problem["n"] == 4
        assert problem["correct"] == counted.get(problem["id"], 0)
        assert (problem["split"] is not None) == (0 < problem["correct"] < 4)
    kept = sum(0 < p["correct"] < 4 for p in summary["problems"])
    assert kept >= 2, "the parity check should leave several problems strictly inside (0, 1)"
    assert len((split / "eval.jsonl").read_text().splitlines()) == 1
    assert len((split / "train.jsonl").read_text().splitlines()) == kept - 1
