"""Region statistics of per-token advantages, relative to the first wrong step.

A rollout with a first error splits into three regions: ``before`` (tokens ahead of the wrong step),
``at`` (the wrong step's tokens) and ``after`` (the rest, end of sequence included). A rollout without one
(correct, or a critique that names no wrong step) is one region, ``all``. For each region the statistics
pool the tokens of every rollout added: mean A_t, mean |A_t| and the fraction of tokens with A_t < 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["REGIONS", "RegionStats", "region_bounds"]

REGIONS = ("before", "at", "after", "all")


def region_bounds(
    length: int, step_spans: list[tuple[int, int]], first_error: int | None
) -> dict[str, tuple[int, int]]:
    """Token bounds ``[start, end)`` of each region of a response of ``length`` tokens."""
    if first_error is None:
        return {"all": (0, length)}
    if not 0 <= first_error < len(step_spans):
        raise ValueError(f"first_error {first_error} is not one of the {len(step_spans)} steps of the response")
    start, end = step_spans[first_error]
    return {"before": (0, start), "at": (start, end), "after": (end, length)}


@dataclass
class _Sums:
    total: float = 0.0
    absolute: float = 0.0
    negative: int = 0
    tokens: int = 0


class RegionStats:
    """Accumulates A_t over rollouts, region by region; :meth:`summary` gives the pooled statistics."""

    def __init__(self) -> None:
        self.sums = {region: _Sums() for region in REGIONS}
        self.rollouts = {region: 0 for region in REGIONS}

    def add(self, advantages, step_spans: list[tuple[int, int]], first_error: int | None) -> None:
        """Add one rollout's A_t (a sequence or 1-D tensor over its response tokens)."""
        values = torch.as_tensor(advantages, dtype=torch.float64).flatten()
        for region, (start, end) in region_bounds(len(values), step_spans, first_error).items():
            part = values[start:end]
            sums = self.sums[region]
            sums.total += float(part.sum())
            sums.absolute += float(part.abs().sum())
            sums.negative += int((part < 0).sum())
            sums.tokens += part.numel()
            self.rollouts[region] += 1

    def as_tensor(self) -> torch.Tensor:
        """``[regions, 5]``: sum A_t, sum |A_t|, negative tokens, tokens, rollouts (to all-reduce by sum)."""
        return torch.tensor(
            [[s.total, s.absolute, s.negative, s.tokens, self.rollouts[r]] for r, s in self.sums.items()],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, table: torch.Tensor) -> "RegionStats":
        """The inverse of :meth:`as_tensor` (e.g. after summing the tables of several processes)."""
        stats = cls()
        for region, row in zip(REGIONS, table.tolist(), strict=False):
            stats.sums[region] = _Sums(row[0], row[1], int(round(row[2])), int(round(row[3])))
            stats.rollouts[region] = int(round(row[4]))
        return stats

    def summary(self) -> dict[str, dict[str, float]]:
        """Per region that has tokens: ``mean``, ``mean_abs``, ``neg_frac``, ``tokens``, ``rollouts``."""
        out = {}
        for region, s in self.sums.items():
            if s.tokens:
                out[region] = {
                    "mean": s.total / s.tokens,
                    "mean_abs": s.absolute / s.tokens,
                    "neg_frac": s.negative / s.tokens,
                    "tokens": s.tokens,
                    "rollouts": self.rollouts[region],
                }
        return out
