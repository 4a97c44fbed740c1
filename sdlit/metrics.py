"""Sampling metrics over n answers per problem: Avg@k, Pass@k, Maj@k (torchmetrics, distributed-correct).

Every metric keeps two sum states, the summed per-problem score and the number of problems, reduced with
`dist_reduce_fx="sum"`, so `compute()` across ranks equals one process seeing every problem.
"""

import math
from collections import Counter

import torch
from torchmetrics import Metric

from sdlit.tasks.answers import gold_value, normalize_number, same_number


def _as_correct(correct, k):
    """Validate `correct` as a [problems, n] bool tensor with n >= k and return it as bool."""
    correct = torch.as_tensor(correct)
    if correct.is_floating_point() or correct.is_complex():
        raise ValueError(f"correct must be a bool tensor [problems, n], got dtype {correct.dtype}")
    if correct.dim() != 2:
        raise ValueError(f"correct must have shape [problems, n], got shape {tuple(correct.shape)}")
    if correct.shape[1] < k:
        raise ValueError(f"correct has n={correct.shape[1]} samples per problem, fewer than k={k}")
    return correct.bool()


class _ScoreAtK(Metric):
    """Base: the mean over problems of a per-problem score in [0, 1]."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k, **kwargs):
        """k: number of samples per problem the metric is about (n >= k must be given to update)."""
        super().__init__(**kwargs)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("num_problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores):
        """Accumulate a 1-D tensor of per-problem scores."""
        self.score_sum += scores.to(self.score_sum.device, torch.float32).sum()
        self.num_problems += scores.numel()

    def compute(self):
        """Mean per-problem score, a float32 scalar in [0, 1] (0 when no problem was seen)."""
        if self.num_problems == 0:
            return torch.tensor(0.0, device=self.score_sum.device)
        return self.score_sum / self.num_problems


class AvgAtK(_ScoreAtK):
    """Avg@k: mean accuracy over the samples of each problem, averaged over problems.

    With n > k samples the mean over all n is used (an unbiased estimate of the mean over k).
    """

    def update(self, correct, answers=None, golds=None):
        """correct: bool [problems, n], n >= k. answers and golds are accepted and ignored."""
        correct = _as_correct(correct, self.k)
        self._add(correct.float().mean(dim=1))


def pass_at_k(n, c, k):
    """Unbiased pass@k for one problem: 1 - C(n - c, k) / C(n, k), in the stable product form.

    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i); it is 0 when n - c < k.
    With n == k this is 1 if c > 0 else 0 (any correct).
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


class PassAtK(_ScoreAtK):
    """Pass@k: probability that at least one of k samples is correct, averaged over problems.

    With n == k: any correct. With n > k: the unbiased estimator 1 - C(n - c, k) / C(n, k).
    """

    def update(self, correct, answers=None, golds=None):
        """correct: bool [problems, n], n >= k. answers and golds are accepted and ignored."""
        correct = _as_correct(correct, self.k)
        n = correct.shape[1]
        counts = correct.sum(dim=1).tolist()
        self._add(torch.tensor([pass_at_k(n, c, self.k) for c in counts], dtype=torch.float64))


def majority_answer(answers):
    """Most frequent non-None answer (the same number written differently counts once), ties -> earliest first
    occurrence; None if none.

    Returns (answer, index of its first occurrence) or (None, None).
    """
    stripped = [_answer_key(a) for a in answers]
    counts = Counter(a for a in stripped if a is not None)
    if not counts:
        return None, None
    best = max(counts.values())
    for j, a in enumerate(stripped):
        if a is not None and counts[a] == best:
            return a, j
    raise AssertionError("unreachable")


def _answer_key(answer):
    """Answers that are the same number count as one ("3", "3.0", "3.00"); other text is compared stripped."""
    if answer is None:
        return None
    return normalize_number(answer) or answer.strip()


class MajAtK(_ScoreAtK):
    """Maj@k: is the majority answer among the first k samples correct, averaged over problems.

    The majority answer is the most frequent non-None answer (None = unparseable never wins; ties go to
    the answer that occurs first). A problem whose k answers are all None counts as wrong. The majority
    answer is judged against `golds` when given (numeric compare with tolerance, else stripped string
    equality); otherwise it is correct iff `correct[i, j]` for its first sample j.
    """

    def update(self, correct, answers=None, golds=None):
        """correct: bool [problems, n]; answers: per problem a list of n str|None; golds: optional list of str."""
        correct = _as_correct(correct, self.k)
        problems, n = correct.shape
        if answers is None:
            raise ValueError("MajAtK.update needs `answers`: per problem, the list of n extracted answers")
        if len(answers) != problems:
            raise ValueError(f"answers has {len(answers)} problems, correct has {problems}")
        for i, row in enumerate(answers):
            if len(row) != n:
                raise ValueError(f"answers[{i}] has {len(row)} answers, correct has n={n} per problem")
        if golds is not None and len(golds) != problems:
            raise ValueError(f"golds has {len(golds)} entries, correct has {problems} problems")
        scores = [self._problem_score(correct[i], answers[i], golds, i) for i in range(problems)]
        self._add(torch.tensor(scores, dtype=torch.float32))

    def _problem_score(self, correct_row, answers_row, golds, i):
        """1.0 if the majority of the first k answers is correct, else 0.0."""
        answer, first = majority_answer(answers_row[: self.k])
        if answer is None:
            return 0.0
        if golds is not None:
            return float(same_number(answer, gold_value(str(golds[i]))))
        return float(bool(correct_row[first]))
