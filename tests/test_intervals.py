"""sdlit.intervals: per-problem scores from samples files, the crossed bootstrap against a slow loop and against
the normal approximation, its coverage, paired differences, and the before/after table of the quickstart."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest

from sdlit.callbacks.evaluation import SAMPLE_COLUMNS
from sdlit.intervals import (
    Interval,
    bootstrap,
    compare,
    main,
    paired_difference,
    problem_scores,
    read_samples,
    score_matrix,
)


def write_samples(path, table, step=0):
    """A samples CSV: per problem, per sample (extracted answer, correct, tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        for i, samples in enumerate(table):
            for j, (answer, correct, tokens) in reversed(list(enumerate(samples))):  # out of order on purpose
                writer.writerow({"step": step, "problem": f"p{i}", "sample": j, "question": "q", "gold": "7",
                                 "response": "r", "extracted": answer, "correct": correct, "tokens": tokens})
    return path


def slow_bootstrap(scores, reps, level, rng):
    """Resample seed rows and problem columns by index, one replicate at a time (the reference)."""
    seeds, problems = scores.shape
    means = []
    for _ in range(reps):
        rows = [rng.randrange(seeds) for _ in range(seeds)] if seeds > 1 else [0]
        cols = [rng.randrange(problems) for _ in range(problems)]
        means.append(sum(scores[r, c] for r in rows for c in cols) / (len(rows) * len(cols)))
    means.sort()
    tail = (1 - level) / 2
    return means[int(tail * reps)], means[int((1 - tail) * reps) - 1]


def test_problem_scores_follow_the_metrics(tmp_path):
    path = write_samples(tmp_path / "s.csv", [
        [("7", True, 10), ("8", False, 20), ("8", False, 30)],  # majority 8: wrong
        [("", False, 40), ("7", True, 50), ("", False, 60)],    # unparseable answers never win: majority 7
        [("1", False, 5), ("2", False, 5), ("3", False, 5)],
    ])
    scores = problem_scores(read_samples(path))
    assert scores["p0"] == pytest.approx({"avg": 1 / 3, "pass": 1.0, "maj": 0.0, "length": 20.0})
    assert scores["p1"] == pytest.approx({"avg": 1 / 3, "pass": 1.0, "maj": 1.0, "length": 50.0})
    assert scores["p2"] == pytest.approx({"avg": 0.0, "pass": 0.0, "maj": 0.0, "length": 5.0})
    assert problem_scores(read_samples(path), k=1)["p0"]["avg"] == 1.0  # sample 0 first, whatever the file order
    with pytest.raises(ValueError, match="fewer than k=4"):
        problem_scores(read_samples(path), k=4)


def test_bootstrap_matches_a_slow_resampling_loop_with_seeds_and_without():
    rng = np.random.default_rng(3)
    problem_effect = rng.uniform(0, 1, size=30)
    for seeds in (1, 3):
        scores = np.clip(problem_effect + rng.normal(0, 0.2, size=(seeds, 30)) + np.arange(seeds)[:, None] * 0.1, 0, 1)
        fast = bootstrap(scores, reps=20_000, seed=1)
        low, high = slow_bootstrap(scores, 4000, 0.95, random.Random(2))
        assert fast.mean == pytest.approx(scores.mean())
        assert fast.low == pytest.approx(low, abs=0.012) and fast.high == pytest.approx(high, abs=0.012)


def test_bootstrap_agrees_with_the_normal_approximation_on_many_problems():
    scores = np.random.default_rng(0).binomial(12, 0.3, size=2000) / 12
    interval = bootstrap(scores, reps=20_000)
    half = 1.96 * scores.std(ddof=1) / np.sqrt(scores.size)
    assert interval.low == pytest.approx(scores.mean() - half, abs=0.1 * half)
    assert interval.high == pytest.approx(scores.mean() + half, abs=0.1 * half)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(300):
        p = rng.beta(1, 3, size=48)  # per-problem success rates, true mean 0.25
        scores = rng.binomial(12, p) / 12
        interval = bootstrap(scores, reps=2000, seed=trial)
        covered += interval.low <= 0.25 <= interval.high
    assert 0.89 <= covered / 300 <= 0.99


def test_seed_resampling_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, size=(1, 40))
    agreeing = np.repeat(base, 3, axis=0)
    disagreeing = agreeing + np.array([[-0.2], [0.0], [0.2]])
    narrow, wide = bootstrap(agreeing), bootstrap(disagreeing)
    assert narrow.mean == pytest.approx(wide.mean)
    assert (wide.high - wide.low) > 1.5 * (narrow.high - narrow.low)


def test_paired_difference_cancels_problem_difficulty():
    rng = np.random.default_rng(4)
    before = rng.uniform(0, 1, size=(3, 48))
    after = before + 0.05 + rng.normal(0, 0.02, size=before.shape)
    paired = paired_difference(after, before)
    unpaired_half = (bootstrap(after).high - bootstrap(after).low) / 2
    assert paired.mean == pytest.approx(0.05, abs=0.01) and paired.excludes_zero and paired.low > 0
    assert (paired.high - paired.low) / 2 < unpaired_half / 5
    with pytest.raises(ValueError, match="same seeds and problems"):
        paired_difference(after[:, :10], before)
    assert not Interval(0.01, -0.02, 0.04).excludes_zero and Interval(-0.03, -0.05, -0.01).excludes_zero


def test_score_matrix_aligns_problems_and_names_missing_ones():
    runs = [{"a": {"avg": 0.1}, "b": {"avg": 0.2}, "c": {"avg": 0.5}}, {"b": {"avg": 0.4}, "a": {"avg": 0.3}}]
    assert score_matrix(runs, "avg").tolist() == [[0.1, 0.2], [0.3, 0.4]]
    with pytest.raises(ValueError, match=r"run 1 has no samples of problems \['c'\]"):
        score_matrix(runs, "avg", ["a", "c"])


def test_before_after_table_reads_run_directories(tmp_path, capsys):
    right, wrong = ("7", True, 10), ("9", False, 12)
    before = [[wrong, wrong, wrong, right]] * 20 + [[wrong] * 4] * 20
    after = [[right, right, wrong, right]] * 20 + [[right, wrong, wrong, wrong]] * 20
    write_samples(tmp_path / "before/logs/version_0/samples/val_step000000.csv", before)
    write_samples(tmp_path / "after/logs/version_0/samples/val_step000008.csv", after, step=8)
    main([str(tmp_path / "before"), str(tmp_path / "after"), "--reps", "2000"])
    printed = capsys.readouterr().out
    assert "40 problems, k=4" in printed
    assert "| avg@4 | 12.50 [" in printed and "| 50.00 [" in printed and "+37.50 [" in printed
    assert "Training raised held-out Avg@4 by +37.50 points" in printed
    write_samples(tmp_path / "same.csv", before)
    lines = compare(tmp_path / "before", tmp_path / "same.csv", reps=500)
    assert "contains 0" in lines[-1]
    write_samples(tmp_path / "fewer.csv", before[:10])
    with pytest.raises(ValueError, match="different problems"):
        compare(tmp_path / "before", tmp_path / "fewer.csv")
    with pytest.raises(FileNotFoundError, match="no samples"):
        compare(tmp_path / "nothing", tmp_path / "after")
