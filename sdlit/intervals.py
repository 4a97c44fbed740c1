"""Confidence intervals for held-out accuracy: per-problem scores from the evaluation sample files, a percentile
bootstrap over problems (and seeds), and paired differences between two evaluations of the same problems.

Avg@k, Pass@k and Maj@k are means over problems of a per-problem score (the fraction of the k samples that are
right; whether any is; whether the majority answer is), so their uncertainty comes from which problems were drawn,
which seed trained the model and which samples the evaluation drew. The bootstrap resamples problems with
replacement, and seeds too when there are several (crossed: every resampled seed is scored on the same resampled
problems), and reports the 2.5th and 97.5th percentiles of the mean. A paired difference resamples the same
problems (and seeds) for both sides, so how hard each problem is cancels out.

``python -m sdlit.intervals BEFORE AFTER`` prints the before/after table of two ``sdlit validate`` runs
(``make quickstart`` does): each argument is a run directory (its newest samples file) or a samples CSV.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdlit.metrics import AvgAtK, MajAtK, PassAtK

METRICS = ("avg", "pass", "maj")


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval ``[low, high]`` (at ``level``)."""

    mean: float
    low: float
    high: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or entirely below zero."""
        return self.low > 0 or self.high < 0

    def format(self, scale: float = 100.0, signed: bool = False) -> str:
        """``mean [low, high]`` scaled (percent by default); ``signed`` writes a + on positive values."""
        sign = "+" if signed else ""
        return f"{self.mean * scale:{sign}.2f} [{self.low * scale:{sign}.2f}, {self.high * scale:{sign}.2f}]"


def read_samples(path: str | Path) -> dict[str, list[dict]]:
    """The rows of one samples CSV (``AvgAtKEvaluation``) grouped by problem id, each group in sample order."""
    problems: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            missing = {"problem", "sample", "correct", "extracted", "tokens"} - row.keys()
            if missing:
                raise ValueError(f"{path}: not a samples file of AvgAtKEvaluation (no column {sorted(missing)})")
            problems.setdefault(row["problem"], []).append(row)
    for rows in problems.values():
        rows.sort(key=lambda r: int(r["sample"]))
    return problems


def problem_scores(samples: dict[str, list[dict]], k: int | None = None) -> dict[str, dict[str, float]]:
    """Per problem: ``avg`` (fraction right), ``pass`` (any right), ``maj`` (majority answer right) over its first
    ``k`` samples (default: the fewest any problem has), and ``length`` (mean tokens); scored by sdlit.metrics."""
    k = k or min(len(rows) for rows in samples.values())
    scores = {}
    for problem, rows in samples.items():
        if len(rows) < k:
            raise ValueError(f"problem {problem!r} has {len(rows)} samples, fewer than k={k}")
        rows = rows[:k]
        correct = torch.tensor([[r["correct"] == "True" for r in rows]])
        answers = [[r["extracted"] or None for r in rows]]
        scores[problem] = {name: _score(metric, correct, answers)
                           for name, metric in (("avg", AvgAtK(k)), ("pass", PassAtK(k)), ("maj", MajAtK(k)))}
        scores[problem]["length"] = sum(int(r["tokens"]) for r in rows) / k
    return scores


def _score(metric, correct: torch.Tensor, answers: list) -> float:
    metric.update(correct, answers)
    return float(metric.compute())


def score_matrix(runs: list[dict[str, dict[str, float]]], metric: str, problems: list[str] | None = None) -> np.ndarray:
    """``[seeds, problems]`` scores of ``metric`` from per-seed :func:`problem_scores`, on the problems every run
    has (or the given ones, which every run must have)."""
    problems = problems or sorted(set.intersection(*(set(r) for r in runs)))
    for i, run in enumerate(runs):
        missing = [p for p in problems if p not in run]
        if missing:
            raise ValueError(f"run {i} has no samples of problems {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return np.array([[run[p][metric] for p in problems] for run in runs], dtype=np.float64)


def bootstrap(scores: np.ndarray, reps: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``scores`` (``[problems]`` or ``[seeds, problems]``) and its percentile bootstrap interval.

    Each replicate draws problems with replacement and, with several seeds, seeds with replacement independently
    (a crossed design); its statistic is the mean over the drawn seeds and problems. Counts of how often each seed
    and problem was drawn make that one matrix product per replicate.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    seeds, problems = scores.shape
    if problems < 2:
        raise ValueError(f"a bootstrap over problems needs at least 2 problems, got {problems}")
    rng = np.random.default_rng(seed)
    problem_counts = rng.multinomial(problems, np.full(problems, 1 / problems), size=reps)
    if seeds > 1:
        seed_counts = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=reps)
    else:
        seed_counts = np.ones((reps, 1))
    means = np.einsum("rs,sp,rp->r", seed_counts, scores, problem_counts) / (seeds * problems)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(scores.mean()), float(low), float(high), level)


def paired_difference(after: np.ndarray, before: np.ndarray, **kwargs) -> Interval:
    """``after - before`` on the same seeds and problems (same shape, same order), with its bootstrap interval."""
    after, before = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if after.shape != before.shape:
        raise ValueError(f"paired scores need the same seeds and problems, got shapes {after.shape} and {before.shape}")
    return bootstrap(after - before, **kwargs)


def newest_samples(path: str | Path) -> Path:
    """A samples CSV itself, or the newest ``samples/*_step*.csv`` under a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.glob("**/samples/*_step*.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no samples/*_step*.csv under {path}: was it evaluated with AvgAtKEvaluation?")
    return files[-1]


def compare(before: str | Path, after: str | Path, reps: int = 10_000) -> list[str]:
    """A Markdown table of two evaluations of the same problems: each metric before and after with its interval,
    and the paired difference with its interval."""
    before_file, after_file = newest_samples(before), newest_samples(after)
    after_samples = read_samples(after_file)
    first, second = problem_scores(read_samples(before_file)), problem_scores(after_samples)
    if set(first) != set(second):
        raise ValueError(f"{before_file} and {after_file} evaluate different problems: a paired difference needs "
                         "the same ones")
    problems = sorted(first)
    k = min(len(rows) for rows in after_samples.values())
    lines = [f"held-out: {len(problems)} problems, k={k}; mean [95% bootstrap interval over problems], in %",
             "", "| metric | before | after | after - before |", "|---|---|---|---|"]
    for metric in (*METRICS, "length"):
        a, b = score_matrix([first], metric, problems), score_matrix([second], metric, problems)
        scale = 1.0 if metric == "length" else 100.0
        name = "mean length (tokens)" if metric == "length" else f"{metric}@{k}"
        difference = paired_difference(b, a, reps=reps)
        lines.append(f"| {name} | {bootstrap(a, reps).format(scale)} | {bootstrap(b, reps).format(scale)} | "
                     f"{difference.format(scale, signed=True)} |")
        if metric == "avg":
            verdict = reading(difference, f"Avg@{k}")
    return lines + ["", verdict]


def reading(difference: Interval, name: str) -> str:
    """One sentence on what a before/after difference interval allows one to conclude."""
    if not difference.excludes_zero:
        return (f"{name} changed by {difference.mean * 100:+.2f} points; the 95% interval contains 0, so these "
                "problems cannot tell this change from sampling noise.")
    direction = "raised" if difference.mean > 0 else "lowered"
    return (f"Training {direction} held-out {name} by {difference.mean * 100:+.2f} points; the 95% interval "
            f"[{difference.low * 100:+.2f}, {difference.high * 100:+.2f}] excludes 0.")


def main(argv: list[str] | None = None) -> None:
    """``python -m sdlit.intervals BEFORE AFTER``: the before/after table with paired 95% intervals."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("before", help="run directory (its newest samples file) or samples CSV")
    parser.add_argument("after", help="run directory (its newest samples file) or samples CSV")
    parser.add_argument("--reps", type=int, default=10_000, help="bootstrap replicates")
    args = parser.parse_args(argv)
    print("\n".join(compare(args.before, args.after, args.reps)))


if __name__ == "__main__":
    main()
