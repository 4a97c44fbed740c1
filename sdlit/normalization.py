"""One optimizer step's loss, normalised over the whole step: every micro-batch and every rank.

A step of gradient accumulation over micro-batches, on several data-parallel ranks, should make the same update as
one big batch of the same rollouts. A token mean per micro-batch, then averaged over micro-batches (Lightning
divides each by ``accumulate_grad_batches``) and ranks (DDP averages gradients), weighs a token of a short
micro-batch more than one of a long micro-batch. Instead each micro-batch returns the *sum* of its token losses;
:class:`StepLoss` adds up the sums and the loss-token counts of the step's micro-batches, and once the last one has
run backward, :meth:`StepLoss.scale_gradients` multiplies every gradient by ``accumulate x world_size / N`` with N
the step's loss tokens summed over all ranks. The update is then that of ``sum of token losses / N`` over the whole
step (TRL's ``num_items_in_batch``), whatever the split, and :meth:`StepLoss.finish` gives the logged per-step
values on the same footing.
"""

from __future__ import annotations

import torch
from torch import nn


class StepLoss:
    """The running loss sums and loss-token count of the optimizer step in progress."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, sums: dict[str, torch.Tensor], count: int) -> None:
        """Add one micro-batch: the (detached) loss sums by name and its number of loss tokens (or sequences)."""
        for name, value in sums.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += count

    def global_totals(self, strategy) -> tuple[dict[str, float], float]:
        """The step's sums and count added over all ranks (a collective: every rank calls it)."""
        names = sorted(self.sums)
        device = self.sums[names[0]].device if names else torch.device("cpu")
        local = torch.stack([self.sums[n] for n in names] + [torch.tensor(float(self.count), device=device)])
        total = strategy.reduce(local, reduce_op="sum") if strategy is not None else local
        values = total.tolist()
        return dict(zip(names, values[:-1], strict=False)), values[-1]

    def scale_gradients(self, model: nn.Module, total_count: float, accumulate: int, world_size: int) -> None:
        """Turn the accumulated (and rank-averaged) gradients of the loss sums into those of the step's mean."""
        factor = accumulate * world_size / max(total_count, 1.0)
        if factor == 1.0:
            return
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(factor)

    def finish(self, totals: dict[str, float], total_count: float) -> dict[str, float]:
        """The step's logged values (each sum over its count), and a fresh start for the next step."""
        self.sums, self.count = {}, 0
        return {name: value / max(total_count, 1.0) for name, value in totals.items()}
