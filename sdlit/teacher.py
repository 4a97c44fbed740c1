"""Which weights the self-teacher uses: ``base``, ``current`` or ``ema``.

- ``base``: the frozen initial policy (the paper's choice). With LoRA this is the model with its adapter
  disabled, which costs nothing; without LoRA a snapshot of the initial weights is swapped in.
- ``current``: the live weights under stop-gradient.
- ``ema``: an exponential moving average of the trainable weights, swapped in for the teacher pass; its
  state is part of the checkpoint.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Literal

import torch
from torch import nn

TeacherMode = Literal["base", "current", "ema"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout: a deterministic teacher target) and put back each module's mode."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


class TeacherWeights:
    """Puts the teacher's weights in place for the duration of a ``with teacher.weights(model):`` block.

    The teacher pass also runs in eval mode (:func:`eval_mode`): with LoRA dropout a train-mode teacher would give
    a random target."""

    def __init__(self, mode: TeacherMode = "base", ema_decay: float = 0.99):
        if mode not in ("base", "current", "ema"):
            raise ValueError(f"teacher must be 'base', 'current' or 'ema', got {mode!r}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {ema_decay}")
        self.mode = mode
        self.ema_decay = ema_decay
        self.shadow: dict[str, torch.Tensor] | None = None  # snapshot (base, no adapter) or running average

    def weights(self, model: nn.Module):
        """Context manager in which ``model`` computes with the teacher's weights."""
        if self.mode == "current":
            return nullcontext()
        if self.mode == "base" and hasattr(model, "disable_adapter"):
            return model.disable_adapter()
        return self._swapped(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After an optimizer step: move the EMA towards the live weights (no-op for other modes)."""
        if self.mode != "ema":
            return
        if self.shadow is None:
            self._snapshot(model)
            return
        self._follow_device(model)
        for name, param in _trainable(model):
            self.shadow[name].lerp_(param.detach().to(self.shadow[name].dtype), 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights, for the checkpoint (empty when the mode keeps none)."""
        return {k: v.detach().cpu() for k, v in (self.shadow or {}).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore shadow weights saved by :meth:`state_dict`."""
        self.shadow = {k: v.clone() for k, v in state.items()} if state else None

    @contextmanager
    def _swapped(self, model: nn.Module) -> Iterator[None]:
        if self.shadow is None:
            self._snapshot(model)
        self._follow_device(model)
        params = dict(_trainable(model))
        live = {}
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                param = params[name]
                live[name] = param.detach().clone()
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, saved in live.items():
                    params[name].copy_(saved)

    def _follow_device(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        for name, shadow in self.shadow.items():
            if shadow.device != device:
                self.shadow[name] = shadow.to(device)

    @torch.no_grad()
    def _snapshot(self, model: nn.Module) -> None:
        self.shadow = {name: param.detach().clone() for name, param in _trainable(model)}


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
