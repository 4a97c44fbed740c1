"""Wall-clock time of the phases of a training step (rollout, feedback, teacher, student).

The module owns one :class:`PhaseTimer`. The datamodule times the rollout and feedback phases where they happen
(``on_after_batch_transfer``), the module times its teacher and student passes, and at the end of its training
step the module logs the step's times and closes the step with :meth:`PhaseTimer.finish_step`. The progress
bar reads :attr:`PhaseTimer.last` (the finished step) to show where the time goes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

PHASES = ("rollout", "feedback", "teacher", "student")


class PhaseTimer:
    """Seconds spent per named phase in the current step, and those of the last finished step.

    Args:
        synchronize: Wait for queued CUDA work at the start and end of each phase, so that a phase's time is
            its GPU time and not only the time to launch its kernels (a few synchronisations per step).
    """

    def __init__(self, synchronize: bool = True):
        self.synchronize = synchronize
        self.current: dict[str, float] = {}
        self.current_tokens = 0
        self.last: dict[str, float] = {}
        self.last_tokens = 0

    @contextmanager
    def phase(self, name: str):
        """Add the wall time of the ``with`` block to phase ``name`` of the current step (also when it raises)."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start

    def add_tokens(self, count: int) -> None:
        """Count ``count`` trained response tokens in the current step (for tokens/s)."""
        self.current_tokens += int(count)

    def finish_step(self) -> dict[str, float]:
        """Close the current step: it becomes :attr:`last`; return its phase seconds."""
        self.last, self.last_tokens = self.current, self.current_tokens
        self.current, self.current_tokens = {}, 0
        return self.last

    def _sync(self) -> None:
        if self.synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
