"""The non-finite step guard: a step whose loss or gradients are NaN/inf changes nothing and is counted.

After ``max_consecutive`` such steps in a row, training stops with :class:`NonFiniteTrainingError`;
the checkpoints already written (all from good steps) stay as they are.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from sdlit.sharding import local_tensor

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped because too many steps in a row had a non-finite loss or gradient."""


class StepGuard:
    """Checks each step's loss and gradients; counts the skipped steps.

    Args:
        max_consecutive: Stop after this many non-finite steps in a row (0: never stop, only skip).
    """

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive_bad_steps must be at least 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def step_is_finite(self, loss: torch.Tensor | None, model: nn.Module, check_grads: bool = True) -> bool:
        """True when ``loss`` and every gradient of ``model`` are finite (gradients only if ``check_grads``)."""
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            return False
        if not check_grads:
            return True
        grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]  # sharded: this rank's
        if not grads:
            return True
        norms = torch.stack([g.detach().float().norm() for g in grads])  # inf/nan in any grad shows in its norm
        return bool(torch.isfinite(norms).all())

    def record(self, finite: bool, step: int, loss: torch.Tensor | None) -> None:
        """Count a step; raise :class:`NonFiniteTrainingError` after too many bad ones in a row."""
        if finite:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        value = float(loss.detach()) if loss is not None else math.nan
        log.warning(
            "step %d skipped: non-finite loss or gradient (loss=%s); %d skipped so far, %d in a row",
            step, value, self.skipped, self.consecutive,
        )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {self.consecutive} consecutive steps had a non-finite loss or "
                f"gradient (limit model.max_consecutive_bad_steps={self.max_consecutive}; {self.skipped} steps "
                "skipped in all). No weights were updated by those steps and the checkpoints already saved are "
                "intact: lower the learning rate, enable gradient clipping (trainer.gradient_clip_val) or check the "
                "data, then resume with --ckpt_path last"
            )

    def state_dict(self) -> dict[str, int]:
        """The counters, for the checkpoint."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters saved by :meth:`state_dict`."""
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
