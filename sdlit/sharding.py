"""Sharded training with FSDP2 (PyTorch ``fully_shard``) through Lightning's ``ModelParallelStrategy``.

The solver is sharded in :meth:`sdlit.module.SelfDistillationModule.configure_model`: every decoder layer is one
FSDP unit (its weights gathered for its forward and backward, then freed), and the root (embeddings, final norm,
output head) another, all on the data-parallel mesh. ``--trainer.strategy fsdp2`` (:class:`FSDP2Strategy`) is
``ModelParallelStrategy`` set up for that: every process is a data-parallel rank, and a checkpoint is one file with
the trainable weights, as on one process.

Three places read weights outside a forward pass, where FSDP2 would hand them out as shards; each gathers first:

- sampling (:func:`gathered_weights`): the decode loop reads the weights of every layer at every step, so all
  units are gathered for the whole call and sharded again after it;
- the teacher's weight swap (:func:`reshard_all`, used by :class:`sdlit.teacher.TeacherWeights`): FSDP2 keeps the
  root unit gathered after a forward, so a swap must write into the shards with every unit sharded, or the next
  forward computes with the gathered copy of the other weights;
- the fused output head reads the head's weight outside the model's forward: under sharding the losses use the
  logits instead (logged once).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of ``model`` (modules sharded with ``fully_shard``), the root last; empty when unsharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return units[1:] + units[:1] if units and units[0] is model else units


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` has been sharded with FSDP2."""
    return model is not None and bool(fsdp_modules(model))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model: modules of the classes it names in ``_no_split_modules``
    (every decoder-layer class of transformers' models), found through a peft wrapper too."""
    from sdlit.models import base_model

    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot shard {type(base_model(model)).__name__}: it names no decoder-layer classes in _no_split_modules, "
            "so sdlit does not know which modules to shard one by one"
        )
    return layers


def shard_solver(model: nn.Module, mesh) -> nn.Module:
    """Shard ``model`` with FSDP2 on ``mesh`` (1-D, data-parallel): each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)  # the root: FSDP2 keeps it gathered from forward to backward
    return model


def reshard_all(model: nn.Module) -> None:
    """Free the gathered weights of every FSDP unit: the parameters are the shards again (no-op when unsharded)."""
    for unit in fsdp_modules(model):
        unit.reshard()


@contextmanager
def gathered_weights(model: nn.Module) -> Iterator[None]:
    """The full weights of every FSDP unit in place for the block (one all-gather per unit, kept through every
    forward inside), sharded again after it. Code that reads weights outside a forward (sdlit's decode loop) then
    sees plain tensors. A no-op for an unsharded model."""
    units = fsdp_modules(model)
    if not units:
        yield
        return
    root = units[-1]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not root, recurse=False)  # as shard_solver set them
        reshard_all(model)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a sharded parameter or gradient); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this rank's shard when ``like`` is a DTensor (every rank holds the same
    ``full``; no communication), else ``full`` on ``like``'s device. The dtype stays ``full``'s."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(like.device)
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def whole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded model, on CPU, on rank 0 (other ranks get an empty dict); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_strategy(strategy) -> None:
    """sdlit shards over data-parallel ranks only: refuse a ``ModelParallelStrategy`` with tensor parallelism
    (its gradients would not be synchronised across the tensor-parallel ranks)."""
    mesh = strategy.device_mesh
    tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    if tensor_parallel > 1:
        raise ValueError(
            f"sdlit shards the solver with FSDP2 over data-parallel ranks only, and this ModelParallelStrategy has "
            f"tensor_parallel_size={tensor_parallel} (its default on one node is the number of devices): use "
            "--trainer.strategy fsdp2, or give ModelParallelStrategy init_args tensor_parallel_size: 1 and "
            "data_parallel_size: the number of processes"
        )


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as sdlit shards with it: FSDP2 over all processes (every process a
    data-parallel rank, no tensor parallelism), and checkpoints as one file of the trainable weights, the same file
    as one process writes (``sdlit validate --ckpt_path``, HFExport and resuming with another world size read it).

    Args:
        save_distributed_checkpoint: Write each rank's shards to a checkpoint folder instead of gathering the
            trainable weights into one file on rank 0 (for full fine-tuning of a model too big to gather).
        process_group_backend: ``gloo``, ``nccl``...; default: the device's (gloo on CPU, nccl on CUDA).
    """

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        """Every process is a data-parallel rank."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def register_strategy() -> None:
    """Make ``--trainer.strategy fsdp2`` name :class:`FSDP2Strategy` (idempotent)."""
    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 over all processes (sdlit)")


register_strategy()
