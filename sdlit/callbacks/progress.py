"""PhaseProgressBar: Lightning's rich progress bar, plus where the time of a training step goes.

A step of self-distillation is four phases: sample the rollouts, compute their feedback, the teacher pass and
the student pass (then backward and the optimizer step). The module's :class:`sdlit.timing.PhaseTimer` measures
them where they happen; this bar shows the last step's seconds and share of each phase, ``other`` (backward,
optimizer, logging: the rest of the step's wall time) and the trained response tokens per second.
"""

from __future__ import annotations

import time

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

from sdlit.timing import PHASES


class PhaseProgressBar(RichProgressBar):
    """A rich progress bar that shows the phases of the last training step and its tokens/s.

    Args:
        refresh_rate: Refresh every this many batches (0 disables the bar).
        leave: Leave the finished epoch bars on screen.
        show_phases: Show the phase times and tokens/s next to the logged metrics.
        console_kwargs: Arguments of the rich ``Console`` (e.g. ``{force_terminal: true}``).
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        leave: bool = False,
        show_phases: bool = True,
        console_kwargs: dict | None = None,
    ):
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        self.show_phases = show_phases
        self._step_started: float | None = None
        self.step_seconds: float | None = None  # wall time of the last training step (batch)

    def _restart_clock(self) -> None:
        self._step_started = time.perf_counter()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the bar of the epoch and the clock of its first step."""
        super().on_train_epoch_start(trainer, pl_module)
        self._restart_clock()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validation inside fit is not part of the next step's time."""
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit":
            self._restart_clock()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        """Measure the step's wall time (since the previous step ended), then update the bar."""
        now = time.perf_counter()
        if self._step_started is not None:
            self.step_seconds = now - self._step_started
        self._step_started = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """The logged progress-bar metrics, then the last step's phases and tokens/s."""
        items = super().get_metrics(trainer, pl_module)
        timer = getattr(pl_module, "phase_timer", None)
        if self.show_phases and timer is not None and timer.last:
            items.update(phase_items(timer.last, timer.last_tokens, self.step_seconds))
        return items


def phase_items(phases: dict[str, float], tokens: int, step_seconds: float | None) -> dict[str, str]:
    """Display items: ``{"rollout": "1.20s 45%", ..., "other": ..., "tok/s": "812"}``.

    Shares are of the step's wall time when known, else of the phases' sum.
    """
    timed = sum(phases.values())
    total = step_seconds if step_seconds and step_seconds >= timed else timed
    names = [p for p in PHASES if p in phases] + sorted(set(phases) - set(PHASES))
    items = {name: _seconds_and_share(phases[name], total) for name in names}
    if step_seconds and step_seconds > timed:
        items["other"] = _seconds_and_share(step_seconds - timed, total)
    if total > 0:
        items["tok/s"] = f"{tokens / total:.0f}"
    return items


def _seconds_and_share(seconds: float, total: float) -> str:
    share = 100.0 * seconds / total if total > 0 else 0.0
    return f"{seconds:.2f}s {share:.0f}%"
