"""HFExport: the best checkpoint as a Hugging Face model (LoRA merged, or the adapter alone), reloaded and run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdlit.callbacks.export import export_hf
from sdlit.cli import run_cli
from sdlit.models import LoraSettings, add_lora

from conftest import write_config


def export_callback(dirpath, **init_args):
    return {"class_path": "sdlit.callbacks.HFExport", "init_args": {"dirpath": str(dirpath), **init_args}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """3 LoRA steps; held-out evaluation after every step; best by val/avg@2; exports merged and adapter-only."""
    tmp = tmp_path_factory.mktemp("export")
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(tmp / "ckpt"), "monitor": "val/avg@2", "mode": "max", "save_last": True, "save_top_k": 1}}
    evaluation = {"class_path": "sdlit.callbacks.AvgAtKEvaluation", "init_args": {
        "every_n_steps": 1, "console_problems": 0}}
    config = write_config(tmp, tiny_model_dir, callbacks=[
        "ReferenceSolution", evaluation, checkpoint,
        export_callback(tmp / "merged"), export_callback(tmp / "adapter", merge_lora=False),
    ], extra_trainer={"max_steps": 3, "limit_val_batches": None, "enable_checkpointing": True}, evaluation={"k": 2})
    cli = run_cli(["fit", "--config", config])
    return tmp, cli


def reference_model(base_dir, checkpoint_path):
    """Independent reference: the base model, a fresh LoRA adapter, the checkpoint's weights loaded by hand."""
    model = add_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraSettings(r=4, alpha=8))
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    missing, unexpected = model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_holds_the_best_checkpoint_not_the_last_weights(trained, tiny_model_dir):
    tmp, cli = trained
    best = cli.trainer.checkpoint_callback.best_model_path
    info = json.loads((tmp / "merged" / "sdlit_export.json").read_text())
    assert info["source"] == best and info["merged_lora"] is True and info["adapter_only"] is False
    assert info["monitor"] == "val/avg@2" and info["score"] == pytest.approx(
        float(cli.trainer.checkpoint_callback.best_model_score))
    assert info["step"] == torch.load(best, weights_only=False)["global_step"]

    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    expected = logits(reference_model(tiny_model_dir, best), ids)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-4)
    if info["step"] != cli.trainer.global_step:  # best is an earlier step: the export is not the live weights
        live = cli.model.model.eval()
        assert not torch.allclose(logits(live, ids), expected, atol=1e-6)


def test_adapter_only_export_reloads_with_from_pretrained(trained, tiny_model_dir):
    tmp, cli = trained
    best = cli.trainer.checkpoint_callback.best_model_path
    assert (tmp / "adapter" / "adapter_config.json").exists()
    assert not (tmp / "adapter" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp / "adapter").eval()  # transformers + peft: base + adapter
    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    torch.testing.assert_close(logits(reloaded, ids), logits(reference_model(tiny_model_dir, best), ids),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_exported_model_generates_with_its_tokenizer(trained, kind):
    tmp, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(tmp / kind)
    model = AutoModelForCausalLM.from_pretrained(tmp / kind)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]), str)


def test_training_model_is_untouched_and_current_weights_fallback(trained, tmp_path):
    _, cli = trained
    module = cli.model
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    info = export_hf(module, tmp_path / "now", checkpoint_path=None, merge_lora=True)
    assert info["source"] == "current weights" and info["step"] == cli.trainer.global_step
    after = dict(module.model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert type(module.model).__name__ == "PeftModelForCausalLM"  # the copy was merged, not the training model
    ids = torch.tensor([[5, 17, 42, 99]])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "now").eval()
    torch.testing.assert_close(logits(exported, ids), logits(module.model.eval(), ids), atol=1e-5, rtol=1e-4)


def test_fit_without_checkpoint_exports_current_weights_and_says_so(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, callbacks=["ReferenceSolution", export_callback(tmp_path / "hf")],
                          extra_trainer={"max_steps": 1})
    with pytest.warns(UserWarning, match="no best checkpoint"):
        run_cli(["fit", "--config", config])
    assert json.loads((tmp_path / "hf" / "sdlit_export.json").read_text())["source"] == "current weights"


def test_export_refuses_to_replace_a_foreign_directory(trained, tmp_path):
    _, cli = trained
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export_hf(cli.model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_checkpoint_of_another_lora_setting_is_a_clear_error(trained, tmp_path):
    _, cli = trained
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"model.not_a_weight": torch.zeros(1)}, "global_step": 1}, bad)
    with pytest.raises(ValueError, match="do not fit the model"):
        export_hf(cli.model, tmp_path / "out", checkpoint_path=str(bad))
