"""HFExport: write the best checkpoint as a Hugging Face model directory (LoRA merged, or the adapter alone).

sdlit checkpoints hold only the trainable weights (e.g. the LoRA adapter, see
``SelfDistillationModule.on_save_checkpoint``), so a checkpoint is read as: the module's base model plus those
weights. The export loads them into a *copy* of the training model (the run itself is never touched), merges
the adapter with peft's ``merge_and_unload`` unless asked for the adapter alone, and saves the model with its
tokenizer, loadable by ``AutoModelForCausalLM.from_pretrained(dirpath)``.
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
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True, on_new_best: bool = False):
        self.dirpath = dirpath
        self.merge_lora = merge_lora
        self.on_new_best = on_new_best
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
        if not trainer.is_global_zero:
            self.exported_from = source or "current weights"
            return None
        if not source:
            rank_zero_warn("HFExport: no best checkpoint (no ModelCheckpoint saved one): exporting the current weights")
        target = self.output_dir(trainer)
        info = export_hf(pl_module, target, source, merge_lora=self.merge_lora, checkpoint_callback=_first_best(trainer))
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
) -> dict:
    """Save ``pl_module``'s model (with ``checkpoint_path``'s weights when given) and tokenizer to ``target``.

    Returns the export record also written to ``target/sdlit_export.json``.
    """
    target = Path(target)
    _check_replaceable(target)
    model = copy.deepcopy(pl_module.model)
    info = {"source": "current weights", "step": int(pl_module.global_step), "merged_lora": False}
    if checkpoint_path:
        info.update(source=str(checkpoint_path), step=load_trainable_weights(model, checkpoint_path))
    if checkpoint_callback is not None and checkpoint_callback.best_model_score is not None:
        info.update(monitor=checkpoint_callback.monitor, score=float(checkpoint_callback.best_model_score))
    if merge_lora and _is_peft(model):
        model = model.merge_and_unload()
        info["merged_lora"] = True
    info["adapter_only"] = _is_peft(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        pl_module.tokenizer.save_pretrained(staging)
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # a half-written export is never left under the target name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    del model
    return info


def load_trainable_weights(model: torch.nn.Module, checkpoint_path: str) -> int:
    """Load an sdlit checkpoint's weights (the trainable ones, keys ``model.*``) into ``model``; return its step."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"{checkpoint_path}: the checkpoint holds no model weights (state_dict keys 'model.*')")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"{checkpoint_path}: {len(result.unexpected_keys)} weights do not fit the model (e.g. "
            f"{result.unexpected_keys[0]!r}): was it trained with another model or LoRA setting?"
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if missing:
        raise ValueError(
            f"{checkpoint_path}: {len(missing)} trainable weights are missing (e.g. {missing[0]!r}): "
            "was it trained with another LoRA setting?"
        )
    return int(checkpoint.get("global_step", 0))


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _check_replaceable(target: Path) -> None:
    if target.exists() and any(target.iterdir()) and not (target / EXPORT_INFO).exists():
        raise FileExistsError(
            f"HFExport: {target} exists and is not an earlier export (no {EXPORT_INFO}): choose another dirpath"
        )
