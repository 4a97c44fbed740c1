"""4-bit and 8-bit solvers through bitsandbytes (QLoRA): loading, k-bit training set-up, 8-bit optimizers, export.

The base weights of a quantised solver are bitsandbytes ``Linear4bit`` (``nf4``/``fp4``) or ``Linear8bitLt``
(``int8``) layers and stay frozen; only a LoRA adapter on top of them trains. These layers subclass ``nn.Linear``,
but their ``.weight`` is packed: code that reads weights directly (the decode-time linears, the lean Llama decode
step) must leave them to their own forward, and an export that merges the adapter first de-quantises the base
(:func:`dequantized_model`).

bitsandbytes is an optional dependency (the ``quantization`` extra); it is imported only when a setting needs it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from typing import Literal

import torch
from torch import nn

from sdlit.checkpointing import preserved_rng_states

log = logging.getLogger(__name__)

Quantization = Literal["nf4", "fp4", "int8"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
QUANTIZATIONS = ("nf4", "fp4", "int8")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def check_settings(quantization: str | None, optimizer: str, lora, compute_dtype: str | None) -> None:
    """Raise a clear error for a quantisation or optimizer setting of the module that cannot train."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if optimizer != "adamw":
        require_bitsandbytes(f"optimizer {optimizer!r}")
    if quantization is None:
        return
    check_quantization(quantization, compute_dtype)
    if lora is None:
        raise ValueError(
            f"quantization {quantization!r} needs a LoRA adapter: the quantised base weights are frozen and only "
            "the adapter trains (QLoRA); set model.lora (e.g. lora: {r: 16}) or quantization: null"
        )


def check_quantization(kind: str, compute_dtype: str | None = None) -> None:
    """Raise a clear error for an unknown quantisation kind or compute dtype, or a missing bitsandbytes."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or null, got {kind!r}")
    if compute_dtype is not None:
        torch_dtype(compute_dtype, "quantization_compute_dtype")
    require_bitsandbytes(f"quantization {kind!r}")


def torch_dtype(name: str, setting: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` (e.g. "bfloat16"), or a ValueError naming ``setting``."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{setting} must name a torch dtype such as float32 or bfloat16, got {name!r}")
    return dtype


def require_bitsandbytes(what: str) -> None:
    """Raise an ImportError saying how to install bitsandbytes when it is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{what} needs bitsandbytes: pip install 'sdlit[quantization]'")


def quiet_int8_cast_warning() -> None:
    """Silence bitsandbytes' log warning, repeated at every 8-bit matmul, that fp32 inputs are cast to fp16 (the way
    its int8 layers always compute)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastFilter) for f in logger.filters):
        logger.addFilter(_Int8CastFilter())


class _Int8CastFilter(logging.Filter):
    """Drops bitsandbytes' "MatMul8bitLt: inputs will be cast" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def bnb_config(kind: str, compute_dtype: torch.dtype = torch.float32, double_quantization: bool = True):
    """The ``transformers.BitsAndBytesConfig`` of ``kind``: 4-bit ``nf4``/``fp4`` (matmuls in ``compute_dtype``,
    the block scales quantised too with ``double_quantization``) or 8-bit ``int8``."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quantization,
    )


def device_map(device: torch.device | str | None) -> str | dict[str, int]:
    """Where ``from_pretrained`` puts a quantised model: ``"cpu"``, or the whole model on one CUDA device."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return "cpu"
    return {"": device.index if device.index is not None else torch.cuda.current_device()}


def prepare_for_kbit_training(model, gradient_checkpointing: bool):
    """peft's recommended set-up of a loaded quantised model: base weights frozen, norms and other non-quantised
    weights in fp32, activation checkpointing when asked for."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def one_cpu_4bit_kernel(model: nn.Module) -> int:
    """Turn off bitsandbytes' AVX512-BF16 packed CPU kernel on every 4-bit layer; returns how many had it on.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel the first time the layer runs
    in eval mode without gradients, and from then on computes in bf16. That is the teacher pass but not the
    student pass, so the two would score the same weights with different kernels (a divergence that is not there),
    and the repacking fails outright for layers narrower than the quantisation block. One kernel for every pass.
    """
    if not _bnb_linear_types():
        return 0
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    switched = sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in layers)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    if switched:
        log.info("bitsandbytes: the AVX512-BF16 packed CPU kernel is off on %d 4-bit layers (one kernel for the "
                 "teacher and the student passes)", switched)
    return switched


def build_optimizer(kind: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``kind`` over ``params``: torch's AdamW, bitsandbytes' AdamW8bit or PagedAdamW8bit (whose state
    is paged on CUDA only: on CPU bitsandbytes says so and keeps it in ordinary memory)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    require_bitsandbytes(f"optimizer {kind!r}")
    import bitsandbytes as bnb

    if kind == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)  # CPU: bitsandbytes warns, not paged


def _bnb_linear_types() -> tuple[type, ...]:
    """bitsandbytes' quantised linear classes, or () when it is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return ()
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear (its ``.weight`` is packed)."""
    types = _bnb_linear_types()
    return bool(types) and isinstance(module, types)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` (a peft wrapper or a Hugging Face model) is a bitsandbytes linear."""
    return any(is_quantized_linear(m) for m in model.modules())


def quantization_bits(model: nn.Module) -> int | None:
    """4 or 8: the width of ``model``'s quantised linears; None when it has none."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            return 4
        if isinstance(module, bnb.nn.Linear8bitLt):
            return 8
    return None


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of ``model`` (a Hugging Face model, LoRA layers injected or not) as plain tensors, named as in
    the unquantised model: bitsandbytes weights de-quantised, ``.base_layer`` dropped, adapter weights left out."""
    from peft.utils.integrations import dequantize_bnb_weight

    weights = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if "lora_" in full:
                continue
            if is_quantized_linear(module) and name == "weight":
                param = dequantize_bnb_weight(param, state=getattr(module, "state", None))
            weights[full.replace(".base_layer", "")] = param.detach()
    return weights


def dequantized_model(model: nn.Module, dtype: torch.dtype):
    """A plain (unquantised) Hugging Face model of ``model``'s config in ``dtype``, holding its de-quantised base
    weights (``model``: the quantised Hugging Face model, LoRA layers injected or not; it is not changed)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with preserved_rng_states():  # the plain model's random init must not shift the run's random draws
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = dequantized_weights(model)
    expected = plain.state_dict().keys()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"de-quantising: {len(missing)} plain weights have no source, e.g. {missing[0]!r}")
    plain.load_state_dict({name: weights[name].to(dtype) for name in expected})
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()
