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

from sdlit.sharding import full_tensor, reshard_all, shard_like

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
        reshard_all(model)  # sharded (FSDP2): the average follows this rank's shards
        if self.shadow is None:
            self._snapshot(model)
            return
        self._place_shadow(model)
        for name, param in _trainable(model):
            self.shadow[name].lerp_(param.detach().to(self.shadow[name].dtype), 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights as whole tensors, for the checkpoint (empty when the mode keeps none). Sharded
        (FSDP2), the shards are gathered: every rank calls it."""
        return {k: full_tensor(v).detach().cpu() for k, v in (self.shadow or {}).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore shadow weights saved by :meth:`state_dict`."""
        self.shadow = {k: v.clone() for k, v in state.items()} if state else None

    @contextmanager
    def _swapped(self, model: nn.Module) -> Iterator[None]:
        # Sharded (FSDP2), the swap writes into the shards with every unit sharded: FSDP2 keeps the root unit gathered
        # after a forward, and a gathered copy of the teacher's weights must not reach the student's forward.
        reshard_all(model)
        if self.shadow is None:
            self._snapshot(model)
        self._place_shadow(model)
        live = {}
        with torch.no_grad():
            params = dict(_trainable(model))
            for name, shadow in self.shadow.items():
                live[name] = params[name].detach().clone()
                params[name].copy_(shadow)
        try:
            yield
        finally:
            reshard_all(model)
            with torch.no_grad():
                params = dict(_trainable(model))
                for name, saved in live.items():
                    params[name].copy_(saved)

    def _place_shadow(self, model: nn.Module) -> None:
        """Lay the shadow out as the weights are: their device, and this rank's shard when they are sharded (a
        shadow restored from a checkpoint holds whole tensors)."""
        params = dict(_trainable(model))
        for name, shadow in self.shadow.items():
            param = params[name]
            if shadow.device != param.device or type(shadow) is not type(param.data):
                self.shadow[name] = shard_like(shadow, param.data)

    @torch.no_grad()
    def _snapshot(self, model: nn.Module) -> None:
        self.shadow = {name: param.detach().clone() for name, param in _trainable(model)}


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
