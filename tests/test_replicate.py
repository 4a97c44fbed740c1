"""bench/replicate.py and bench/replication_report.py: stage configs, durable records from sample files, the
learning-rate and checkpoint choice on validation problems, intervals and paired differences in the report,
resuming, and (slow) the whole pipeline of real `sdlit` runs on the tiny model."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sdlit.callbacks.evaluation import SAMPLE_COLUMNS

from conftest import load_bench_script


@pytest.fixture(scope="module")
def replicate():
    return load_bench_script("replicate")


@pytest.fixture(scope="module")
def report(replicate):
    return replicate.report


def write_samples(path: Path, step: int, table: dict[str, list[tuple[str, bool, int]]]) -> None:
    """One samples CSV: per question, per sample (extracted answer, correct, tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        for i, (question, samples) in enumerate(table.items()):
            for j, (answer, correct, tokens) in enumerate(samples):
                writer.writerow({"step": step, "problem": f"gsm8k/eval/{i}", "sample": j, "question": question,
                                 "gold": "7", "response": "r", "extracted": answer, "correct": correct,
                                 "tokens": tokens})


def write_split(split_dir: Path, validation: list[str], held_out: list[str]) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, questions in (("validation.jsonl", validation), ("eval.jsonl", held_out)):
        (split_dir / name).write_text("".join(json.dumps({"question": q, "answer": "#### 7", "id": f"arith/{q}"})
                                              + "\n" for q in questions))


def test_stage_configs_point_into_the_run_directory(replicate, tmp_path):
    args = replicate.parse_args(["--epochs", "5", "--eval-every", "4", "--max-new-tokens", "40"])
    assert args.seeds == [0, 1, 2] and len(args.lr_grid) >= 2 and args.held_out >= 48 and args.validation > 0
    settings = replicate.merged(replicate.common_settings(args), replicate.training_settings(args, 3e-4),
                                {"model": tmp_path / "warm", "split_dir": tmp_path / "s"})
    config = replicate.run_config("critique", tmp_path / "run", 3, **settings)
    assert config["seed_everything"] == 3
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    assert trainer["default_root_dir"] == str(tmp_path / "run") and trainer["max_epochs"] == 5
    assert "accelerator" in trainer and trainer["accelerator"] == "cpu"  # None keeps the YAML's setting
    assert "save_dir" not in trainer["logger"][0]["init_args"]  # follows default_root_dir
    assert replicate.callback(config, "AvgAtKEvaluation")["every_n_steps"] == 4
    assert model["model"] == str(tmp_path / "warm") and model["learning_rate"] == 3e-4
    assert model["lora"] == {"r": 16, "alpha": 32}
    assert data["task"]["init_args"]["train_path"] == str(tmp_path / "s" / "train.jsonl")
    assert data["task"]["init_args"]["eval_path"] == str(tmp_path / "s" / "evaluation.jsonl")
    assert data["task"]["init_args"]["train_size"] == args.train_problems
    assert data["evaluation"]["k"] == 12 and data["evaluation"]["max_new_tokens"] == 40
    assert data["sampling"]["max_new_tokens"] == 40
    band = replicate.run_config("filter", tmp_path / "f", split_dir=tmp_path / "s", **replicate.merged(
        replicate.common_settings(args), {"callbacks": {"ProblemBandFilter.held_out": 5,
                                                        "ProblemBandFilter.validation": 3}}))
    assert replicate.callback(band, "ProblemBandFilter") == {
        "output_dir": str(tmp_path / "s"), "low": 0.0, "high": 0.3125, "held_out": 5, "validation": 3}
    gpu = replicate.parse_args(["--gpu", "--seeds", "0"])
    assert gpu.seeds == [0] and gpu.precision == "bf16-mixed" and gpu.lora_r == 64 and gpu.held_out > args.held_out
    gpu_config = replicate.run_config("grpo", tmp_path / "g", **replicate.merged(
        replicate.common_settings(gpu), replicate.training_settings(gpu, 2e-5)))
    assert gpu_config["model"]["init_args"]["lora"] == {"r": 64, "alpha": 128}
    assert gpu_config["data"]["init_args"]["sampler"] == "vllm"


def test_scores_are_recorded_per_problem_with_their_split(replicate, tmp_path):
    right, wrong = ("7", True, 10), ("8", False, 30)
    write_split(tmp_path / "split", ["qa"], ["qb", "qc"])
    run_dir, record = tmp_path / "run", tmp_path / "record"
    write_samples(run_dir / "logs/version_0/samples/val_step000004.csv", 4,
                  {"qa": [right, wrong, wrong], "qb": [wrong, wrong, right], "qc": [("", False, 5)] * 3})
    write_samples(run_dir / "logs/version_1/samples/val_step000008.csv", 8,  # a resumed run's second log dir
                  {"qa": [right] * 3, "qb": [wrong] * 3, "qc": [("8", False, 5), right, ("8", False, 5)]})
    replicate.write_scores(run_dir, record, replicate.problem_splits(tmp_path / "split"))
    rows = list(csv.DictReader(open(record / "scores.csv")))
    assert [(r["step"], r["split"], r["problem"]) for r in rows] == [
        ("4", "eval", "arith/qb"), ("4", "eval", "arith/qc"), ("4", "validation", "arith/qa"),
        ("8", "eval", "arith/qb"), ("8", "eval", "arith/qc"), ("8", "validation", "arith/qa")]
    assert [float(r["avg"]) for r in rows] == pytest.approx([1 / 3, 0, 1 / 3, 0, 1 / 3, 1])
    assert [float(r["maj"]) for r in rows] == [0, 0, 0, 0, 0, 1]  # qb at step 4: majority 8, wrong
    assert [float(r["pass"]) for r in rows] == [1, 0, 1, 0, 1, 1]
    write_samples(run_dir / "logs/version_1/samples/val_step000012.csv", 12, {"stray": [right]})
    with pytest.raises(ValueError, match="in neither validation.jsonl nor eval.jsonl"):
        replicate.write_scores(run_dir, record, replicate.problem_splits(tmp_path / "split"))


def fake_run(records: Path, name: str, info: dict, curve: dict[int, tuple[float, float]], problems: int = 8,
             rng=None, accuracy=(0.1, 0.5)) -> None:
    """A finished run's records: at each step, validation and held-out per-problem Avg around the given means
    (each problem's avg = mean + a fixed per-problem offset, so paired differences are exact)."""
    folder = records / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    offsets = np.linspace(-0.05, 0.05, problems)
    with open(folder / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("step", "problem", "split", "avg", "pass", "maj", "length"))
        writer.writeheader()
        for step, (val, held) in curve.items():
            for split, mean in (("validation", val), ("eval", held)):
                for p in range(problems):
                    avg = mean + offsets[p]
                    writer.writerow({"step": step, "problem": f"{split}{p}", "split": split, "avg": avg,
                                     "pass": float(avg > 0.2), "maj": float(avg > 0.4), "length": 50 + step})
    steps = max(curve)
    with open(folder / "train.csv", "w", newline="") as f:
        f.write("step,accuracy,loss\n" + "".join(
            f"{s},{accuracy[0] + (accuracy[1] - accuracy[0]) * s / max(1, steps - 1)},0.5\n" for s in range(steps)))
    (folder / "advantage.json").write_text(json.dumps({"at_mean": -0.3, "at_abs": 0.4, "at_neg_frac": 0.3}))
    (folder / "run.json").write_text(json.dumps({"train_problems": 16, "epochs": 2, "eval_every": 4,
                                                 "max_new_tokens": 64, "seconds": 60.0, **info}))


def write_filter(records: Path) -> None:
    (records / "split").mkdir(parents=True, exist_ok=True)
    (records / "split" / "filter.json").write_text(json.dumps({
        "kept": 40, "candidates": 100, "low": 0, "high": 0.3125, "train": 16, "held_out": 8, "validation": 8,
        "problems": [{"id": "a", "correct": 1, "n": 8, "split": "train"}], "seconds": 30.0}))


def test_rate_and_checkpoint_are_chosen_on_validation_and_reported_with_intervals(report, tmp_path):
    records, results, grid = tmp_path / "results" / "replication", tmp_path / "results", [1e-4, 3e-4]
    write_filter(records)
    for seed in (0, 1, 2):
        fake_run(records, f"seed{seed}/warm", {"condition": "warm", "seed": seed}, {0: (0.2, 0.2)})
    # seed 0: 3e-4 is best on validation for critique (0.40 at step 4) although 1e-4 is best on held-out
    fake_run(records, "seed0/critique/lr0.0001", {"condition": "critique", "seed": 0, "lr": 1e-4},
             {4: (0.30, 0.50), 8: (0.35, 0.45)})
    fake_run(records, "seed0/critique/lr0.0003", {"condition": "critique", "seed": 0, "lr": 3e-4},
             {4: (0.40, 0.30), 8: (0.38, 0.35)})
    fake_run(records, "seed0/reference/lr0.0001", {"condition": "reference", "seed": 0, "lr": 1e-4},
             {4: (0.25, 0.25), 8: (0.25, 0.25)})
    with pytest.raises(SystemExit, match=r"reference: seed 0 has not run learning rates \[0.0003\]"):
        report.chosen_rate(records, "reference", grid)
    fake_run(records, "seed0/reference/lr0.0003", {"condition": "reference", "seed": 0, "lr": 3e-4},
             {4: (0.25, 0.20), 8: (0.25, 0.30)})  # a tie on validation: the smaller rate
    assert report.chosen_rate(records, "critique", grid) == 3e-4
    assert report.chosen_rate(records, "reference", grid) == 1e-4
    for seed in (1, 2):
        fake_run(records, f"seed{seed}/critique/lr0.0003", {"condition": "critique", "seed": seed, "lr": 3e-4},
                 {4: (0.30, 0.25), 8: (0.42, 0.40)})
        fake_run(records, f"seed{seed}/reference/lr0.0001", {"condition": "reference", "seed": seed, "lr": 1e-4},
                 {4: (0.25, 0.25), 8: (0.20, 0.20)})
    report.write(records, results, "python bench/replicate.py --test", "test machine", grid)
    text = (results / "replication.md").read_text()
    saved = json.loads((results / "replication.json").read_text())
    assert saved["chosen_rates"] == {"critique": 3e-4, "reference": 1e-4}
    # critique: validation picks step 4 on seed 0 (held-out 0.30) and step 8 on seeds 1, 2 (held-out 0.40)
    assert saved["headline"]["critique"]["avg"]["mean"] == pytest.approx((0.30 + 0.40 + 0.40) / 3)
    assert "| Step-aligned critique (n=1) | 0.0003 | 3 | 4/8/8 | 36.67 [" in text
    # the paper's protocol picks the best held-out step: 0.35 (step 8) on seed 0
    assert "| Step-aligned critique (n=1) | 0.0003 | 3 | 8/8/8 | 38.33 [" in text
    # every per-problem offset cancels in a paired difference: critique - warm is exactly 0.1667 on every resample
    diff = saved["differences"]["critique - warm"]["avg"]
    assert diff["mean"] == pytest.approx(1 / 6) and diff["low"] > 0.09 and diff["high"] < 0.21
    assert "| Step-aligned critique - Warm start | 3 | **+16.67 [" in text
    low = saved["headline"]["critique"]["avg"]["low"]
    assert low < saved["headline"]["critique"]["avg"]["mean"] < saved["headline"]["critique"]["avg"]["high"]
    assert "- Step-aligned critique - Warm start: +16.67 points" in text and "is above warm start" in text
    assert "| Reference solution (n=1) | 0.0001 | 3 | 4/4/4 | 25.00 [" in text
    assert "GRPO (binary reward" not in text.split("## Learning rate")[0]  # no run of it: no row
    assert "| Step-aligned critique (n=1) | 0.0003 | 3 | 8 | 12.9 | 47.1 | +34.3, +34.3, +34.3 |" in text
    assert "Wall time of the stages: " in text and "filter 0.5" in text
    # every evaluation, paired with the same seed's warm start: the per-problem offsets cancel exactly
    assert "| seed0/critique/lr0.0003 | 4 | 40.00 | 30.00 [" in text
    assert "| **+10.00 [+10.00, +10.00]** | 54.0 |" in text
    assert (results / "replication.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_equal_validation_scores_spread_over_other_problems_are_a_tie(report):
    """The records keep per-problem Avg to 6 decimals: 3 of 12 right on one problem and 1 of 12 on each of three
    are the same validation score, so the grid's rule for ties (the smaller rate) decides, not the rounding."""
    def run(lr: float, avgs: list[float]):
        found = report.Run(f"lr{lr:g}", {"condition": "grpo", "seed": 0, "lr": lr})
        found.scores = {8: {"validation": {f"p{i}": {"avg": a} for i, a in enumerate(avgs)}}}
        return found

    spread, one = run(1e-4, [round(1 / 12, 6)] * 3), run(3e-4, [0.25, 0.0, 0.0])
    assert spread.mean(8, "validation") < one.mean(8, "validation")  # 0.249999 / 3 < 0.25 / 3
    assert report.choose({1e-4: spread, 3e-4: one}) == 1e-4
    assert report.choose({1e-4: run(1e-4, [0.25, 0.0, 0.0]), 3e-4: run(3e-4, [1 / 3, 0.0, 0.0])}) == 3e-4


def test_finished_runs_are_skipped_and_cut_fits_resume(replicate, tmp_path, monkeypatch):
    calls = []

    def fake_subprocess(args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(replicate.subprocess, "run", fake_subprocess)
    run_dir = tmp_path / "critique"
    config = replicate.run_config("critique", run_dir)
    replicate.run_sdlit("fit", config, run_dir, threads=1, resume=True)
    assert "--ckpt_path" not in calls[-1]
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    replicate.run_sdlit("fit", config, run_dir, threads=1, resume=True)
    assert calls[-1][-2:] == ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    assert (run_dir / "config.yaml").exists()

    records = tmp_path / "records"
    (records / "runs" / "seed0" / "warm").mkdir(parents=True)
    (records / "runs" / "seed0" / "warm" / "run.json").write_text("{}")
    before = len(calls)
    args = replicate.parse_args(["--threads", "1"])
    replicate.run_stage(args, tmp_path / "out", records, "seed0/warm", "validate", "critique", 0, {}, {}, {})
    assert len(calls) == before  # recorded: not run again

    monkeypatch.setattr(replicate.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 3))
    with pytest.raises(SystemExit, match="sdlit fit failed \\(exit 3\\)"):
        replicate.run_sdlit("fit", config, run_dir, threads=None)


def test_a_resumed_fit_keeps_what_it_logged_before_the_cut_and_reports_a_lost_evaluation(replicate, tmp_path,
                                                                                         monkeypatch):
    """Lightning's CSVLogger deletes the metrics.csv of a version it opens again: a resumed fit logs into the next
    version, the records merge them (a step logged twice: the later), and an evaluation the cut lost is named."""
    monkeypatch.setattr(replicate.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 0))
    run_dir = tmp_path / "run"
    first = run_dir / "logs" / "version_0"
    first.mkdir(parents=True)
    (first / "metrics.csv").write_text("step,train/accuracy,train/loss,advantage/at_mean,val/avg@12\n"
                                       + "".join(f"{s},0.25,1.0,-0.5,\n" for s in range(6))
                                       + "3,,,,0.1\n")  # an evaluation row (not a training step)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    config = replicate.run_config("critique", run_dir)
    replicate.run_sdlit("fit", config, run_dir, threads=None, resume=True)
    written = replicate.yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [lg["init_args"]["version"] for lg in written["trainer"]["logger"]] == [1]
    second = run_dir / "logs" / "version_1"
    second.mkdir()
    (second / "metrics.csv").write_text("step,train/accuracy,train/loss,advantage/at_mean\n"
                                        + "".join(f"{s},0.75,0.5,-0.1\n" for s in range(5, 8)))
    write_split(tmp_path / "split", ["qa"], ["qb"])
    right = ("7", True, 10)
    write_samples(first / "samples" / "val_step000004.csv", 4, {"qa": [right], "qb": [right]})
    write_samples(second / "samples" / "val_step000008.csv", 8, {"qa": [right], "qb": [right]})
    info = {"eval_every": 2, "seed": 0}
    replicate.record_run(run_dir, tmp_path / "record", replicate.problem_splits(tmp_path / "split"), info, True)
    train = list(csv.DictReader(open(tmp_path / "record" / "train.csv")))
    assert [(r["step"], float(r["accuracy"])) for r in train] == [
        ("0", 0.25), ("1", 0.25), ("2", 0.25), ("3", 0.25), ("4", 0.25), ("5", 0.75), ("6", 0.75), ("7", 0.75)]
    advantage = json.loads((tmp_path / "record" / "advantage.json").read_text())
    assert advantage["at_mean"] == pytest.approx((5 * -0.5 + 3 * -0.1) / 8)  # one value per step
    saved = json.loads((tmp_path / "record" / "run.json").read_text())
    assert saved["missing_evaluations"] == [2, 6]  # scheduled 2, 4, 6, 8; scored 4 and 8


def test_a_different_warm_start_is_refused(replicate, tmp_path):
    out, records = tmp_path / "out", tmp_path / "records"
    hf = out / "warmstart" / "hf"
    hf.mkdir(parents=True)
    (hf / "sdlit_export.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"weights")
    args = replicate.parse_args([])
    assert replicate.warm_start(args, out, records) == hf
    assert json.loads((records / "warmstart.json").read_text())["sha256"] == replicate.sha256(hf / "model.safetensors")
    assert replicate.warm_start(args, out, records) == hf  # the same one: fine
    (hf / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(SystemExit, match="is not the one the records .* were trained from"):
        replicate.warm_start(args, out, records)


@pytest.mark.slow
def test_the_whole_design_runs_on_the_tiny_model_and_resumes(replicate, tmp_path, tiny_model_dir):
    """Real `sdlit validate` / `sdlit fit` runs: a recorded warm start and split, two seeds, a grid of two rates
    for seed 0 and the chosen one for seed 1; a second invocation runs nothing."""
    import shutil

    out, results = tmp_path / "out", tmp_path / "results"
    hf = out / "warmstart" / "hf"
    shutil.copytree(tiny_model_dir, hf)
    (hf / "sdlit_export.json").write_text("{}")
    split = results / "replication" / "split"
    questions = [f"Tom has {i} apples. He buys {i + 1} more. How many apples does Tom have now?" for i in range(10)]
    split.mkdir(parents=True)
    rows = [{"question": q, "answer": f"{i}+{i + 1}=<<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n#### {2 * i + 1}",
             "id": f"arith/eval/{i}"} for i, q in enumerate(questions)]
    for name, part in (("train.jsonl", rows[:4]), ("validation.jsonl", rows[4:7]), ("eval.jsonl", rows[7:])):
        (split / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    (split / "filter.json").write_text(json.dumps({"kept": 10, "candidates": 20, "low": 0, "high": 0.3125,
                                                   "train": 4, "held_out": 3, "validation": 3,
                                                   "problems": [{"id": "x", "correct": 1, "n": 8}]}))
    argv = ["--out", str(out), "--results", str(results), "--seeds", "0", "1", "--conditions", "reference", "grpo",
            "--lr-grid", "1e-4", "1e-3", "--train-problems", "4", "--epochs", "2", "--eval-every", "1",
            "--max-new-tokens", "8"]
    replicate.main(argv)
    saved = json.loads((results / "replication.json").read_text())
    assert set(saved["chosen_rates"]) == {"reference", "grpo"}
    for condition in ("reference", "grpo"):
        lr = saved["chosen_rates"][condition]
        assert (results / "replication" / "runs" / "seed1" / condition / f"lr{lr:g}" / "run.json").exists()
        other = ({1e-4, 1e-3} - {lr}).pop()
        assert not (results / "replication" / "runs" / "seed1" / condition / f"lr{other:g}").exists()
        scores = list(csv.DictReader(open(results / "replication" / "runs" / "seed0" / condition / "lr0.0001"
                                          / "scores.csv")))
        assert {r["step"] for r in scores} == {"1", "2"}  # batch 4 of 4 problems: 1 step per epoch, 2 epochs
        assert sorted({r["problem"] for r in scores if r["split"] == "eval"}) == [f"arith/eval/{i}" for i in (7, 8, 9)]
    text = (results / "replication.md").read_text()
    assert "| Warm start (step 0) |  | 2 | 0/0 |" in text and "Reference solution - Warm start" in text
    log = out / "seed0" / "reference" / "lr0.0001" / "fit.log"
    size = log.stat().st_size
    replicate.main(argv)
    assert log.stat().st_size == size  # finished runs are not run again


def test_the_status_blocks_are_filled_from_the_records_and_nothing_else_changes(report, tmp_path):
    records, results, grid = tmp_path / "results" / "replication", tmp_path / "results", [1e-4, 3e-4]
    write_filter(records)
    fake_run(records, "seed0/warm", {"condition": "warm", "seed": 0}, {0: (0.2, 0.2)})
    fake_run(records, "seed0/critique/lr0.0001", {"condition": "critique", "seed": 0, "lr": 1e-4},
             {4: (0.30, 0.10), 8: (0.25, 0.12)})
    fake_run(records, "seed0/critique/lr0.0003", {"condition": "critique", "seed": 0, "lr": 3e-4,
                                                  "missing_evaluations": [12]}, {4: (0.10, 0.05), 8: (0.10, 0.05)})
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\nbefore\n{report.STATUS_BEGIN}\nold status\n{report.STATUS_END}\n\nafter\n")
    report.write(records, results, "python bench/replicate.py", "test machine", grid)
    report.write_status(records, {readme: "results/replication.md"}, grid, [0, 1, 2], list(report.CONDITIONS))
    written = (results / "replication.md").read_text()
    assert "Missing evaluations: seed0/critique/lr0.0003 has none at steps [12]" in written
    text = readme.read_text()
    assert text.startswith("# top\n\nbefore\n" + report.STATUS_BEGIN)
    assert text.endswith(report.STATUS_END + "\n\nafter\n")
    assert "old status" not in text
    # 3 seeds x (warm + 3 conditions) + seed 0's second rate for each of the 3 conditions
    assert "3 of the design's 15 runs are recorded" in text and "on test machine" in text
    assert "([results/replication.md](results/replication.md))" in text
    assert "seed0/critique/lr0.0001 1.0" in text and "filter 0.5" in text  # wall time per stage, in minutes
    # validation chooses lr 1e-4 at step 4, whose held-out Avg is 10 points below the warm start's 20
    assert "| Step-aligned critique (n=1) | 0.0001 | 1 | 4 | 10.00 [" in text
    assert "- Step-aligned critique - Warm start: -10.00 points of held-out Avg@12" in text and "is below" in text
    block = text[text.index(report.STATUS_BEGIN):]
    report.write_status(records, {readme: "results/replication.md"}, grid, [0, 1, 2], list(report.CONDITIONS))
    assert readme.read_text() == text  # filling it again changes nothing
    other = tmp_path / "other.md"
    other.write_text("no markers\n")
    with pytest.raises(SystemExit, match="other.md: no replication status markers"):
        report.write_status(records, {other: "x"}, grid, [0], ["critique"])
    assert block.count(report.STATUS_END) == 1


def test_the_report_is_rebuilt_without_running_anything(report, tmp_path):
    records, results, grid = tmp_path / "results" / "replication", tmp_path / "results", [1e-4]
    write_filter(records)
    fake_run(records, "seed0/warm", {"condition": "warm", "seed": 0}, {0: (0.2, 0.2)})
    fake_run(records, "seed0/grpo/lr0.0001", {"condition": "grpo", "seed": 0, "lr": 1e-4}, {4: (0.3, 0.3)})
    report.write(records, results, "python bench/replicate.py --seeds 0", "recorded machine", grid)
    (results / "replication.md").unlink()
    doc = tmp_path / "doc.md"
    doc.write_text(f"{report.STATUS_BEGIN}\n{report.STATUS_END}\n")
    report.main(["--results", str(results), "--lr-grid", "1e-4", "--seeds", "0", "--conditions", "grpo",
                 "--status", f"{doc}=../results/replication.md"])
    written = (results / "replication.md").read_text()
    assert "Written by `python bench/replicate.py --seeds 0` on recorded machine" in written
    text = doc.read_text()
    assert "all 2 runs of the design are recorded" in text and "| GRPO - Warm start | 1 | **+10.00 [" in text
