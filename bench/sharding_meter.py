"""ShardingMeter: the per-rank figures of ``bench/sharding.py``, measured inside a real ``sdlit fit`` run."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from sdlit.sharding import local_tensor


class ShardingMeter(Callback):
    """Each rank writes ``meter-rank{R}.json``: its step seconds, peak RSS and the bytes of trained state it holds.

    Args:
        out_dir: Where the reports go.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.step_seconds: list[float] = []
        self.state_bytes: dict[str, int] = {}
        self.start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_seconds.append(time.perf_counter() - self.start)
        self.state_bytes = held_state_bytes(pl_module, trainer.optimizers[0])  # after the step: all state exists

    def on_train_end(self, trainer, pl_module):
        report = {"rank": trainer.global_rank, "step_seconds": self.step_seconds, "state_bytes": self.state_bytes,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        (self.out_dir / f"meter-rank{trainer.global_rank}.json").write_text(json.dumps(report))


def held_state_bytes(pl_module, optimizer) -> dict[str, int]:
    """Bytes of this rank's own weights, gradients, optimizer state and EMA teacher (its shards when sharded)."""
    def size(tensor: torch.Tensor) -> int:
        local = local_tensor(tensor)
        return local.numel() * local.element_size()

    params = list(pl_module.model.parameters())
    figures = {
        "weights": sum(size(p.data) for p in params),
        "gradients": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(size(v) for state in optimizer.state.values() for v in state.values()
                         if torch.is_tensor(v) and v.dim() > 0),
        "ema_teacher": sum(size(v) for v in (pl_module.teacher.shadow or {}).values()),
    }
    figures["total"] = sum(figures.values())
    return figures
