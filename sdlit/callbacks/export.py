"""HFExport: write the best checkpoint as a Hugging Face model directory (LoRA merged, or the adapter alone).

sdlit checkpoints hold only the trainable weights (e.g. the LoRA adapter, see
``SelfDistillationModule.on_save_checkpoint``), so a checkpoint is read as: the module's base model plus those
weights. The export loads them into a *copy* of the training model (the run itself is never touched), merges
the adapter with peft's ``merge_and_unload`` unless asked for the adapter alone, and saves the model with its
tokenizer, loadable by ``AutoModelForCausalLM.from_pretrained(dirpath)``.

A quantised (QLoRA, :mod:`sdlit.quantization`) run is never copied: the adapter alone is saved from the checkpoint's
(or the live) adapter weights, and a merged export builds a plain model of the same config in ``merged_dtype``,
fills it with the de-quantised base weights, adds the run's LoRA config with those adapter weights and merges it.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from peft import get_peft_model

from sdlit.models import base_model
from sdlit.quantization import dequantized_model, is_quantized, quantization_bits, torch_dtype
from sdlit.sharding import is_sharded, whole_state

log = logging.getLogger(__name__)

EXPORT_INFO = "sdlit_export.json"


class HFExport(Callback):
    """At the end of fit (and optionally on each new best), export the best checkpoint in Hugging Face format.

    The best checkpoint is ``ModelCheckpoint.best_model_path`` (the first ModelCheckpoint that has one); without
    one (no ModelCheckpoint, or it never saved) the current weights are exported and a warning says so.
    ``sdlit_export.json`` in the directory records what was exported (checkpoint, step, score).

    Args:
        dirpath: Output directory; default ``<trainer.default_root_dir>/hf``. An existing directory is replaced
            only if it holds an earlier export (it has ``sdlit_export.json``) or is empty.
        merge_lora: Merge the LoRA adapter into the base weights (a plain model). ``false`` writes the adapter
            alone (``adapter_config.json``, whose ``base_model_name_or_path`` is the module's model path);
            transformers loads it with ``from_pretrained`` too when peft is installed.
        on_new_best: Also export whenever the best checkpoint changes during fit, not only at the end.
        merged_dtype: Quantised (QLoRA) runs with ``merge_lora``: the dtype of the exported plain model, e.g.
            ``bfloat16``; its base weights are the de-quantised 4-bit or 8-bit ones the adapter was trained on.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True, on_new_best: bool = False,
                 merged_dtype: str = "float32"):
        torch_dtype(merged_dtype, "merged_dtype")
        self.dirpath = dirpath
        self.merge_lora = merge_lora
        self.on_new_best = on_new_best
        self.merged_dtype = merged_dtype
        self.exported_from: str | None = None  # checkpoint path (or "current weights") of the last export

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        """With ``on_new_best``: export when the previous step's validation gave a new best checkpoint."""
        best = best_checkpoint(trainer)
        if self.on_new_best and best and best != self.exported_from:
            self.export(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Export the best checkpoint (or the current weights when there is none)."""
        self.export(trainer, pl_module)

    def output_dir(self, trainer: Trainer) -> Path:
        """Where the export goes."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "hf"

    def export(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Write the export (global rank zero only); return its directory."""
        source = best_checkpoint(trainer)
        # sharded (FSDP2) without a checkpoint: the whole live weights, gathered by every rank
        live_state = whole_state(pl_module.model) if is_sharded(pl_module.model) and not source else None
        if not trainer.is_global_zero:
            self.exported_from = source or "current weights"
            return None
        if not source:
            rank_zero_warn("HFExport: no best checkpoint (no ModelCheckpoint saved one): exporting the current weights")
        target = self.output_dir(trainer)
        info = export_hf(pl_module, target, source, merge_lora=self.merge_lora,
                         checkpoint_callback=_first_best(trainer), merged_dtype=self.merged_dtype,
                         live_state=live_state)
        self.exported_from = source or "current weights"
        log.info("HFExport: wrote %s (from %s)", target, info["source"])
        return target


def best_checkpoint(trainer: Trainer) -> str:
    """The best checkpoint path of the first ModelCheckpoint that has one, else ''."""
    callback = _first_best(trainer)
    return callback.best_model_path if callback else ""


def _first_best(trainer: Trainer) -> ModelCheckpoint | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            return callback
    return None


def export_hf(
    pl_module: LightningModule,
    target: Path,
    checkpoint_path: str | None = None,
    merge_lora: bool = True,
    checkpoint_callback: ModelCheckpoint | None = None,
    merged_dtype: str = "float32",
    live_state: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Save ``pl_module``'s model (with ``checkpoint_path``'s weights when given) and tokenizer to ``target``.

    ``merged_dtype``: the dtype of a merged export of a quantised run. ``live_state``: a sharded (FSDP2) model's
    whole weights, gathered beforehand (:func:`sdlit.sharding.whole_state`), exported when there is no checkpoint.
    Returns the export record also written to ``target/sdlit_export.json``.
    """
    target = Path(target)
    _check_replaceable(target)
    info = {"source": "current weights", "step": int(pl_module.global_step), "merged_lora": False}
    if checkpoint_callback is not None and checkpoint_callback.best_model_score is not None:
        info.update(monitor=checkpoint_callback.monitor, score=float(checkpoint_callback.best_model_score))
    if is_quantized(pl_module.model):
        model, adapter_state = _quantized_export(pl_module, checkpoint_path, merge_lora, merged_dtype, info)
    else:
        model, adapter_state = _plain_export(pl_module, checkpoint_path, merge_lora, info, live_state)
    info["adapter_only"] = _is_peft(model)
    _save(model, pl_module.tokenizer, info, target, adapter_state)
    del model
    return info


def _plain_export(pl_module: LightningModule, checkpoint_path: str | None, merge_lora: bool, info: dict,
                  live_state: dict[str, torch.Tensor] | None = None):
    """A copy of the training model with the checkpoint's weights, its adapter merged unless ``merge_lora`` is off.
    A sharded model is not copied: a fresh unsharded solver gets the checkpoint's weights, or ``live_state``."""
    if is_sharded(pl_module.model):
        model = pl_module.unsharded_solver()
        if not checkpoint_path:
            model.load_state_dict(live_state, strict=True)
    else:
        model = copy.deepcopy(pl_module.model)
    if checkpoint_path:
        info.update(source=str(checkpoint_path), step=load_trainable_weights(model, checkpoint_path))
    if merge_lora and _is_peft(model):
        model = model.merge_and_unload()
        info["merged_lora"] = True
    return model, None


def _quantized_export(pl_module: LightningModule, checkpoint_path: str | None, merge_lora: bool, merged_dtype: str,
                      info: dict):
    """A quantised run's export, without copying its model: the live peft model with the adapter weights to save
    (adapter only), or a plain de-quantised model with the adapter merged."""
    live = pl_module.model
    adapter, step = _adapter_weights(live, checkpoint_path)
    if checkpoint_path:
        info.update(source=str(checkpoint_path), step=step)
    info["quantization"] = getattr(pl_module.hparams, "quantization", None)
    if not merge_lora:
        return live, adapter
    bits = quantization_bits(live)
    rank_zero_warn(f"HFExport: the merged model's base weights are the de-quantised {bits}-bit weights the adapter was "
                   f"trained on: they carry the {bits}-bit rounding, not the original model's full-precision weights")
    dtype = torch_dtype(merged_dtype, "merged_dtype")
    model = get_peft_model(dequantized_model(base_model(live), dtype), copy.deepcopy(live.peft_config["default"]))
    result = model.load_state_dict({name: value.to(dtype) for name, value in adapter.items()}, strict=False)
    lora_missing = sorted(k for k in result.missing_keys if "lora_" in k)
    _check_fits(checkpoint_path or "the live adapter", unexpected=result.unexpected_keys, missing=lora_missing)
    info["merged_lora"] = True
    return model.merge_and_unload(), None


def _adapter_weights(model: torch.nn.Module, checkpoint_path: str | None) -> tuple[dict[str, torch.Tensor], int]:
    """The trainable weights of ``model`` by name: the checkpoint's (checked against the model), else the live ones;
    with the checkpoint's step (0 without one)."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not checkpoint_path:
        return trainable, 0
    state, step = read_trainable_weights(checkpoint_path)
    _check_fits(checkpoint_path, unexpected=sorted(set(state) - set(trainable)),
                missing=sorted(set(trainable) - set(state)))
    return state, step


def _save(model, tokenizer, info: dict, target: Path, adapter_state: dict | None) -> None:
    """Write ``model`` (with ``adapter_state`` as its adapter weights when given), tokenizer and record to
    ``target``, through a staging directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging, **({"state_dict": adapter_state} if adapter_state is not None else {}))
        tokenizer.save_pretrained(staging)
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # a half-written export is never left under the target name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_trainable_weights(model: torch.nn.Module, checkpoint_path: str) -> int:
    """Load an sdlit checkpoint's weights (the trainable ones, keys ``model.*``) into ``model``; return its step."""
    state, step = read_trainable_weights(checkpoint_path)
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    _check_fits(checkpoint_path, unexpected=result.unexpected_keys, missing=sorted(trainable - set(state)))
    return step


def read_trainable_weights(checkpoint_path: str) -> tuple[dict[str, torch.Tensor], int]:
    """An sdlit checkpoint's model weights (keys ``model.*``, the prefix removed) and its global step; a checkpoint
    folder of a sharded run (``save_distributed_checkpoint``) is read whole."""
    if Path(checkpoint_path).is_dir():
        checkpoint = _read_sharded_checkpoint(Path(checkpoint_path))
    else:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"{checkpoint_path}: the checkpoint holds no model weights (state_dict keys 'model.*')")
    return state, int(checkpoint.get("global_step", 0))


def _read_sharded_checkpoint(folder: Path) -> dict:
    """A checkpoint folder of every rank's shards (torch distributed checkpoint) as one checkpoint dict: the weights
    put together, and the step from Lightning's ``meta.pt``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        whole = Path(scratch) / "whole.pt"
        dcp_to_torch_save(folder, whole)
        checkpoint = torch.load(whole, map_location="cpu", weights_only=True)
    meta = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)
    return {"state_dict": checkpoint["state_dict"], "global_step": meta.get("global_step", 0)}


def _check_fits(checkpoint_path: str, unexpected: list[str], missing: list[str]) -> None:
    """A clear error for checkpoint weights the model does not have, or trainable weights the checkpoint lacks."""
    if unexpected:
        raise ValueError(
            f"{checkpoint_path}: {len(unexpected)} weights do not fit the model (e.g. "
            f"{unexpected[0]!r}): was it trained with another model or LoRA setting?"
        )
    if missing:
        raise ValueError(
            f"{checkpoint_path}: {len(missing)} trainable weights are missing (e.g. {missing[0]!r}): "
            "was it trained with another LoRA setting?"
        )


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _check_replaceable(target: Path) -> None:
    if target.exists() and any(target.iterdir()) and not (target / EXPORT_INFO).exists():
        raise FileExistsError(
            f"HFExport: {target} exists and is not an earlier export (no {EXPORT_INFO}): choose another dirpath"
        )
