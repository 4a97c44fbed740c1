"""Checkpoints that survive crashes, and the state an exact resume needs.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the same directory, flushes it to
  disk and renames it over the target, so a crash while saving leaves the previous checkpoint intact. It
  loads with ``weights_only=True`` unless told otherwise: sdlit checkpoints hold only tensors, dicts, lists
  and plain numbers/strings.
- :func:`capture_rng_states` / :func:`restore_rng_states`: the torch (CPU and CUDA), Python and NumPy random
  states as plain, weights_only-safe values, so a resumed run samples the same rollouts.
- :class:`EpochSampler` and :class:`ResumableLoader`: a training order fixed by (seed, epoch) and a loader
  that starts an epoch part-way through, so a resumed run sees the problems an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, DistributedSampler


class AtomicCheckpointIO(TorchCheckpointIO):
    """Torch checkpoints written atomically (temp file, fsync, rename) and loaded ``weights_only``.

    Remote paths (``s3://``...) fall back to Lightning's own transactional write.

    Args:
        weights_only: Load checkpoints with ``torch.load(weights_only=...)`` when the trainer does not say;
            ``True`` refuses pickled code objects in a checkpoint (safe for checkpoints from elsewhere).
    """

    def __init__(self, weights_only: bool = True):
        super().__init__()
        self.weights_only = weights_only

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` so that ``path`` holds either the old or the new file, never half."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None):
        """Load a checkpoint; ``weights_only`` defaults to this plugin's setting."""
        if weights_only is None:
            weights_only = self.weights_only
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _is_local(path: _PATH) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def plain_values(value: Any) -> Any:
    """``value`` with dataclass instances and dict subclasses turned into plain dicts (recursively), so
    ``torch.load(weights_only=True)`` reads it back; lists and tuples are walked, anything else is kept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_values(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_values(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_values(v) for v in value)
    return value


# ---- random state ----------------------------------------------------------------------------------
def capture_rng_states() -> dict[str, Any]:
    """torch CPU/CUDA, Python and NumPy random states as tensors, lists and numbers (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


@contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Run a block that may draw random numbers (e.g. a model's weight init) without changing the global torch,
    Python and NumPy random states seen afterwards."""
    states = capture_rng_states()
    try:
        yield
    finally:
        restore_rng_states(states)


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back the random states saved by :func:`capture_rng_states`."""
    torch.set_rng_state(states["torch"].cpu())
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = states["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- data-stream position --------------------------------------------------------------------------
class EpochSampler(DistributedSampler):
    """Indices ``0..size-1``, shuffled by a generator seeded with ``seed + epoch`` (or in order); rank r of W gets
    positions r, r + W, ... of that order.

    The order of an epoch depends on nothing but (seed, epoch), so a resumed run reproduces it on every rank. When
    the indices do not share evenly among the ranks, the first ones are repeated to fill the last round (as
    Lightning's DistributedSampler does). Being a DistributedSampler, Lightning hands it to the loader as it is, and
    calls :meth:`set_epoch` at the start of each epoch.

    Args:
        size: Number of indices.
        shuffle: Shuffle every epoch; else keep the order.
        seed: Base seed of the shuffle.
        num_replicas: Number of data-parallel ranks.
        rank: This rank.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(rank_share(epoch_order(self.size, self.shuffle, self.seed, self.epoch), self.num_replicas,
                               self.rank))

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)


def epoch_order(size: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """``0..size-1`` shuffled by a generator seeded with ``seed + epoch`` (in order when not ``shuffle``)."""
    if not shuffle:
        return list(range(size))
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def rank_share(items: list, num_replicas: int, rank: int) -> list:
    """Rank ``rank``'s share of ``items``: positions rank, rank + W, ...; when they do not share evenly, the first
    items are repeated to fill the last round (as Lightning's DistributedSampler does)."""
    rounds = -(-len(items) // num_replicas)
    padded = [items[i % len(items)] for i in range(rounds * num_replicas)] if items else []
    return padded[rank::num_replicas]


class ResumableLoader(DataLoader):
    """A DataLoader that knows how far into the epoch training got, and resumes there.

    ``position`` (``{"epoch", "batches"}``: batches trained on in that epoch) is advanced by whoever hands
    batches to training (the datamodule, after Lightning's prefetching); Lightning saves it with the fit
    loop through :meth:`state_dict` and gives it back through :meth:`load_state_dict` before the first pass
    of a resumed run, which then starts after those batches. Later passes (later epochs) are whole; ``len()``
    stays the full epoch, so Lightning's epoch accounting matches an uninterrupted run.

    Args:
        position: The shared position record (created when not given).
    """

    def __init__(self, *args, position: dict | None = None, **kwargs):
        # A DataLoader draws a worker seed at every pass from the global RNG unless it has its own generator;
        # that draw would make an epoch boundary consume randomness that a resumed run does not replay.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self.position = position if position is not None else {"epoch": 0, "batches": 0}
        self.skip_batches = 0

    def state_dict(self) -> dict[str, int]:
        """The data-stream position, for the checkpoint."""
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``: the next pass skips the batches already trained on (none if the epoch ended)."""
        self.position.clear()
        self.position.update(epoch=int(state["epoch"]), batches=int(state["batches"]))
        epoch_ended = self.position["batches"] >= len(self)
        self.skip_batches = 0 if epoch_ended else self.position["batches"]
        if hasattr(self.sampler, "set_epoch"):
            # Lightning creates the first iterator of a resumed fit before it sets the sampler's epoch: set it here
            self.sampler.set_epoch(self.position["epoch"] + int(epoch_ended))

    def __iter__(self):
        batches = super().__iter__()
        skip, self.skip_batches = self.skip_batches, 0
        for _ in range(skip):
            next(batches, None)
        return batches
