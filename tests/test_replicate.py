"""bench/replicate.py: stage configs, metrics recomputed from sample files, results, and resuming."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdlit.callbacks.evaluation import SAMPLE_COLUMNS

from conftest import load_bench_script


@pytest.fixture(scope="module")
def replicate():
    return load_bench_script("replicate")


def write_samples(path: Path, step: int, table: list[list[tuple[str, bool, int]]], gold: str = "7") -> None:
    """One samples CSV: per problem, per sample (extracted answer, correct, tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        for i, samples in enumerate(table):
            for j, (answer, correct, tokens) in enumerate(samples):
                writer.writerow({"step": step, "problem": f"p{i}", "sample": j, "question": "q", "gold": gold,
                                 "response": "r", "extracted": answer, "correct": correct, "tokens": tokens})


def test_stage_configs_point_into_the_run_directory(replicate, tmp_path):
    config = replicate.run_config("critique", tmp_path / "run", 3, model=tmp_path / "warm", split_dir=tmp_path / "s",
                                  trainer={"max_epochs": 5, "max_steps": None},
                                  callbacks={"AvgAtKEvaluation.every_n_steps": 4},
                                  data={"evaluation.k": None, "evaluation.batch_size": 3})
    assert config["seed_everything"] == 3
    trainer, data = config["trainer"], config["data"]["init_args"]
    assert trainer["default_root_dir"] == str(tmp_path / "run") and trainer["max_epochs"] == 5
    assert "max_steps" not in trainer  # None keeps the YAML's setting (here: none)
    assert "save_dir" not in trainer["logger"][0]["init_args"]  # follows default_root_dir
    assert "dirpath" not in replicate.callback(config, "ModelCheckpoint")
    assert replicate.callback(config, "AvgAtKEvaluation")["every_n_steps"] == 4
    assert config["model"]["init_args"]["model"] == str(tmp_path / "warm")
    assert data["task"]["init_args"]["train_path"] == str(tmp_path / "s" / "train.jsonl")
    assert data["evaluation"]["k"] == 12 and data["evaluation"]["batch_size"] == 3
    filter_config = replicate.run_config("filter", tmp_path / "f", split_dir=tmp_path / "s",
                                         callbacks={"ProblemBandFilter.held_out": 5})
    assert replicate.callback(filter_config, "ProblemBandFilter") == {
        "output_dir": str(tmp_path / "s"), "low": 0.0, "high": 0.3125, "held_out": 5}


def test_metrics_are_recomputed_from_the_samples(replicate, tmp_path):
    path = tmp_path / "val_step000004.csv"
    write_samples(path, 4, [
        [("7", True, 10), ("8", False, 20), ("8", False, 30)],  # majority 8: wrong
        [("", False, 40), ("7", True, 50), ("", False, 60)],    # unparseable answers never win: majority 7
        [("1", False, 5), ("2", False, 5), ("3", False, 5)],
    ])
    m = replicate.evaluation_metrics(path)
    assert m["step"] == 4 and m["k"] == 3 and m["problems"] == 3
    assert m["avg"] == pytest.approx(2 / 9)
    assert m["pass"] == pytest.approx(2 / 3)
    assert m["maj"] == pytest.approx(1 / 3)
    assert m["mean_length"] == pytest.approx(225 / 9)


def test_results_pick_the_best_step_per_metric(replicate, tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    (out / "split").mkdir(parents=True)
    (out / "split" / "filter.json").write_text(json.dumps({
        "kept": 20, "candidates": 50, "low": 0, "high": 0.3125, "train": 8, "held_out": 12,
        "problems": [{"id": "a", "correct": 1, "n": 8, "split": "train"}]}))
    right, wrong = ("7", True, 10), ("9", False, 10)
    log = "logs/version_0/samples"
    for seed in (0, 1):
        write_samples(out / f"seed{seed}" / "warm" / log / "val_step000000.csv", 0, [[wrong, wrong], [wrong, right]])
        write_samples(out / f"seed{seed}" / "critique" / log / "val_step000002.csv", 2,
                      [[right, right], [wrong, wrong]])
        write_samples(out / f"seed{seed}" / "critique" / log / "val_step000004.csv", 4,
                      [[right, wrong], [right, wrong]])
        (out / f"seed{seed}" / "critique" / "done.json").write_text("{}")
    args = SimpleNamespace(seeds=[0, 1], conditions=["grpo", "reference", "critique"])
    replicate.write_results(out, results, args, {"seconds": {"warmstart": 60.0}, "machine": "test machine"})
    text = (results / "replication.md").read_text()
    # Avg@2 is 50 at steps 2 and 4 (earliest wins); Pass@2 100 at step 4; Maj@2 100 at step 4 (ties: first answer)
    assert "| Step-aligned critique (n=1) | 2 | 50.00 (50.00-50.00) (2/2) | 100.00 (100.00-100.00) (4/4) " \
           "| 100.00 (100.00-100.00) (4/4) |" in text
    assert "| Warm start (step 0) | 2 | 25.00 (25.00-25.00) (0) | 50.00 (50.00-50.00) (0) |" in text
    assert "GRPO (binary" not in text  # no run of it: no row
    assert (results / "replication.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((results / "replication.json").read_text())
    assert [e["step"] for e in saved["runs"]["critique/seed0"]["curve"]] == [0, 2, 4]


def test_finished_stages_are_skipped_and_cut_fits_resume(replicate, tmp_path, monkeypatch):
    calls = []

    def fake_run(args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(replicate.subprocess, "run", fake_run)
    run_dir = tmp_path / "critique"
    config = replicate.run_config("critique", run_dir)
    replicate.run_sdlit("fit", config, run_dir, threads=1, resume=True)
    assert "--ckpt_path" not in calls[-1]
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    replicate.run_sdlit("fit", config, run_dir, threads=1, resume=True)
    assert calls[-1][-2:] == ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    assert (run_dir / "config.yaml").exists()

    state, state_path, ran = {"seconds": {}}, tmp_path / "state.json", []
    replicate.stage(state, state_path, "x", tmp_path / "done.json", lambda: ran.append(1) or 2.0)
    (tmp_path / "done.json").write_text("{}")
    replicate.stage(state, state_path, "x", tmp_path / "done.json", lambda: ran.append(1) or 2.0)
    assert ran == [1] and json.loads(state_path.read_text())["seconds"] == {"x": 2.0}

    monkeypatch.setattr(replicate.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 3))
    with pytest.raises(SystemExit, match="sdlit fit failed \\(exit 3\\)"):
        replicate.run_sdlit("fit", config, run_dir, threads=None)
