"""Linear layers for decoding: LoRA merged into the weight, and on CPU the weight pre-packed for oneDNN.

A decode step multiplies a few rows (the live rollouts) by every weight of the model. At that shape two things
cost more than the arithmetic:

- **LoRA**: every adapted linear runs two more small matmuls plus a scale and an add per token. Adding the adapter
  into a copy of the weight (``W + scaling * B @ A``, the eval-mode output, since dropout is off) removes them;
- **the CPU GEMM**: PyTorch's default fp32 GEMM reads a weight far below memory bandwidth when it has only a few
  rows, and the output head is the largest weight of a small model. oneDNN, given the weight once in its own
  blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the op ``torch.compile`` uses to pack weights), runs
  the same product several times faster (``bench/step.py``'s sampler ablations; results/step_reference.md).

:func:`decoding_linears` does both for the duration of a ``with`` block, for the rollout sampler
(:mod:`sdlit.sampling.static_cache`): the weights are merged and packed once per sampling call (a small cost against
the call's decode steps), used for every token, then dropped. The model itself is not changed: each
linear gets an instance ``forward`` that is removed on exit, so training, gradients and checkpoints never see the
copies. Layers this cannot merge exactly (DoRA and other LoRA variants, adapter biases, bitsandbytes 4-bit and 8-bit
layers and LoRA on top of them, whose packed ``.weight`` is no plain matrix) keep their own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _lora_linear_type():
    """peft's LoRA ``Linear`` class, or None without peft."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return Linear


def _lora_layer_type():
    """peft's base class of every LoRA layer (plain, bitsandbytes, embedding, ...), or None without peft."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return LoraLayer


def mkldnn_packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's pre-packed linear ops (x86 and ARM CPU builds do)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@contextmanager
def decoding_linears(model: nn.Module, rows: int, pack: bool = True) -> Iterator[int]:
    """Inside the block, every plain or vanilla-LoRA linear of ``model`` runs on a merged (and, for fp32 CPU
    weights with ``pack``, oneDNN-packed) copy of its weight; yields how many layers were switched.

    ``rows``: the batch size the packed layout is tuned for (any batch size works). Forward only: the copies carry
    no gradient. Everything is restored on exit, also after an exception.
    """
    switched: list[nn.Module] = []
    try:
        with torch.no_grad():
            for module in _decodable_linears(model):
                weight, bias = merged_weight(module)
                module.forward = fast_linear(weight, bias, rows, pack)
                switched.append(module)
        yield len(switched)
    finally:
        for module in switched:
            del module.forward  # back to the class's forward


def is_mergeable_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``nn.Linear`` or a vanilla LoRA linear (what :func:`merged_weight` merges)."""
    lora_linear = _lora_linear_type()
    if lora_linear is not None and type(module) is lora_linear:
        return _is_vanilla_lora(module)
    return type(module) is nn.Linear


def _decodable_linears(module: nn.Module) -> Iterator[nn.Module]:
    """Plain ``nn.Linear`` layers and vanilla LoRA linears, outermost first (a LoRA layer's own parts are skipped).

    Quantised linears (bitsandbytes ``Linear4bit``/``Linear8bitLt`` subclass ``nn.Linear``, their ``.weight``
    packed) are neither, and nor are LoRA layers on top of them: they keep their own forward."""
    lora_linear, lora_layer = _lora_linear_type(), _lora_layer_type()
    for child in module.children():
        if lora_layer is not None and isinstance(child, lora_layer):
            if type(child) is lora_linear and _is_vanilla_lora(child):
                yield child
            continue  # never switch the base layer or adapter matrices of a LoRA layer on their own
        if type(child) is nn.Linear:
            yield child
            continue
        yield from _decodable_linears(child)


def _is_vanilla_lora(layer) -> bool:
    """A LoRA linear whose output is exactly ``base(x) + scaling * B(A(x))`` in eval mode."""
    if type(layer.base_layer) is not nn.Linear or getattr(layer, "fan_in_fan_out", False):
        return False
    for name in _active_adapters(layer):
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
            return False
        if layer.lora_B[name].bias is not None:
            return False
    return True


def _active_adapters(layer) -> list[str]:
    if layer.disable_adapters or layer.merged:  # the base layer alone gives the output
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def merged_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias that give the module's eval-mode output: ``W + sum scaling * B @ A`` for LoRA."""
    base = module.base_layer if hasattr(module, "base_layer") else module
    weight = base.weight.detach()
    adapters = _active_adapters(module) if base is not module else []
    if adapters:
        weight = weight.clone()
        for name in adapters:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            weight.addmm_(b.to(weight.dtype), a.to(weight.dtype), alpha=module.scaling[name])
    bias = None if base.bias is None else base.bias.detach()
    return weight, bias


def fast_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, pack: bool):
    """A forward for a linear layer with this weight: oneDNN-packed for fp32 on CPU, else ``F.linear``."""
    if pack and weight.device.type == "cpu" and weight.dtype == torch.float32 and mkldnn_packing_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        out_features = weight.shape[0]

        def packed_forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
            y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
            return y.reshape(*x.shape[:-1], out_features).to(x.dtype)

        return packed_forward

    def merged_forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return merged_forward
