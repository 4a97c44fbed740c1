"""QLoRA: 4-bit and 8-bit solvers through bitsandbytes (on CPU), trained, scored, sampled and exported."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from sdlit.callbacks import HFExport
from sdlit.callbacks.export import export_hf
from sdlit.cli import run_cli
from sdlit.models import LoraSettings
from sdlit.module import SelfDistillationModule
from sdlit.quantization import is_quantized
from sdlit.sampling import cut_at_eos
from sdlit.sampling.linears import decoding_linears
from sdlit.sampling.llama_step import supports_llama_step
from sdlit.sampling.static_cache import sample_with_static_cache
from sdlit.scoring import response_hidden, response_logits, token_logprobs

from conftest import rollouts_with_context, save_wide_model, write_config

bnb = pytest.importorskip("bitsandbytes")
LORA = LoraSettings(r=4, alpha=8)


def quantized_config(tmp_path, model_dir, kind, objective="self_distillation", callbacks=(), teacher="base",
                     n=1, extra_trainer=None):
    """test_fit's 2-step config with ``quantization: kind``."""
    path = write_config(tmp_path, model_dir, objective, callbacks, teacher=teacher, rollouts_per_problem=n,
                        extra_trainer=extra_trainer)
    config = yaml.safe_load(open(path))
    config["model"]["init_args"]["quantization"] = kind
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def quantized_module(model_dir, kind="nf4", lora=LORA, **settings) -> SelfDistillationModule:
    """A loaded quantised solver with a LoRA B of random values (a zero B would hide the adapter)."""
    module = SelfDistillationModule(model=model_dir, lora=lora, quantization=kind, **settings)
    module.configure_model()
    module.log = lambda *args, **kwargs: None  # called outside a fit loop
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return module


def lora_weights(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


FITS = [
    ("self_distillation", ["ReferenceSolution"], 1),
    ("grpo", ["feedback_examples.LengthParityReward"], 4),
    ("sft", [], 1),
]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("objective,callbacks,n", FITS, ids=[f[0] for f in FITS])
def test_two_step_fit_of_a_quantized_solver_moves_the_adapter(tmp_path, tiny_model_dir, kind, objective, callbacks, n):
    cli = run_cli(["fit", "--config", quantized_config(tmp_path, tiny_model_dir, kind, objective, callbacks, n=n)])
    module = cli.model
    assert cli.trainer.global_step == 2
    assert is_quantized(module.model)
    layer = module.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    trainable = [n_ for n_, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n_ for n_ in trainable), "only the adapter trains"
    lora_b = [p for n_, p in module.model.named_parameters() if "lora_B" in n_]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B weights never moved from zero"


@pytest.mark.parametrize("teacher", ["current", "ema"])
def test_other_teachers_train_a_4bit_solver(tmp_path, tiny_model_dir, teacher):
    config = quantized_config(tmp_path, tiny_model_dir, "nf4", callbacks=["ReferenceSolution"], teacher=teacher)
    cli = run_cli(["fit", "--config", config, "--model.gradient_checkpointing", "true"])
    module = cli.model
    assert cli.trainer.global_step == 2 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert float(cli.trainer.callback_metrics["train/abs_advantage"]) >= 0.0
    if teacher == "ema":  # the EMA holds the adapter only, and lags behind it
        shadow, live = module.teacher.shadow, dict(module.model.named_parameters())
        assert shadow and all("lora_" in name for name in shadow)
        assert any(not torch.equal(shadow[name], live[name]) for name in shadow)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("score", [response_logits, response_hidden], ids=["logits", "fused_head"])
def test_base_teacher_is_the_quantized_model_with_its_adapter_disabled(tiny_model_dir, kind, score):
    module = quantized_module(tiny_model_dir, kind)
    rollouts = rollouts_with_context(module.tokenizer)
    assert module.head_is_linear, "the output head stays a plain linear: the fused head applies"
    outputs, _ = module._teacher_outputs(rollouts, score)
    if score is response_hidden:
        outputs = outputs @ module.output_head().T
    teacher_lp = token_logprobs(outputs, module.teacher_batch(rollouts)[0].response_ids)

    batch = module.teacher_batch(rollouts)[0]
    model = module.model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits
        adapted = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids).logits
    width = batch.response_ids.shape[1]
    start = batch.input_ids.shape[1] - width - 1
    expected = token_logprobs(base[:, start:start + width], batch.response_ids)
    with_adapter = token_logprobs(adapted[:, start:start + width], batch.response_ids)
    mask = batch.response_mask
    torch.testing.assert_close(teacher_lp[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(teacher_lp[mask], with_adapter[mask], atol=1e-3), "the adapter must change the output"


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_static_cache_sampler_greedy_tokens_equal_generate(tiny_model_dir, kind):
    model = quantized_module(tiny_model_dir, kind).model.eval()
    assert not supports_llama_step(model), "the lean Llama step must turn itself off for quantised layers"
    with decoding_linears(model, rows=2) as switched:
        assert switched == 1  # the plain output head only: quantised layers (and LoRA on them) keep their forward
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    expected = []
    for prompt in prompts:
        ids = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=0,
                             eos_token_id=[2])
        expected.append(cut_at_eos(ids[0, len(prompt):].tolist(), {2}))
    got = sample_with_static_cache(model, prompts, {2}, pad_id=0, temperature=0.0, max_new_tokens=10)
    assert got == expected


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> str:
    """A tiny Llama whose linear layers, not its embeddings, hold most weights (as in real models)."""
    return save_wide_model(tmp_path_factory.mktemp("wide-llama"))


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters, buffers and bitsandbytes' quantisation state (absmax,
    code books, int8 scales), each storage counted once."""
    tensors = list(model.state_dict().values()) + list(model.parameters()) + list(model.buffers())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_loaded_quantized_solver_holds_under_half_the_bytes_of_fp32(wide_model_dir, kind):
    full = SelfDistillationModule(model=wide_model_dir, lora=LORA)
    full.configure_model()
    quantized = SelfDistillationModule(model=wide_model_dir, lora=LORA, quantization=kind)
    quantized.configure_model()
    assert is_quantized(quantized.model) and not is_quantized(full.model)
    assert held_bytes(quantized.model) < 0.5 * held_bytes(full.model)


@pytest.mark.parametrize("kind", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_step_the_adapter(wide_model_dir, kind):
    module = quantized_module(wide_model_dir, "nf4", lora=LoraSettings(r=32, alpha=64), optimizer=kind)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, bnb.optim.PagedAdamW8bit if kind.startswith("paged") else bnb.optim.AdamW8bit)
    before = lora_weights(module)
    module.model.train()
    module.model(input_ids=torch.tensor([[5, 17, 42, 99, 3, 7]])).logits.logsumexp(-1).mean().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    after = lora_weights(module)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_A" in n)
    assert all(torch.isfinite(v).all() for v in after.values())
    states = [s["state1"] for s in optimizer.state.values()]
    assert any(s.dtype == torch.uint8 for s in states), "no weight got 8-bit optimizer state"
    if kind.startswith("paged"):  # on CPU bitsandbytes says it does not page
        assert any("not supported on CPU" in str(w.message) for w in caught)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """A 2-step nf4 fit, checkpointed every step, exported merged and adapter-only from the best (last) checkpoint."""
    tmp = tmp_path_factory.mktemp("qexport")
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": 1}}
    callbacks = ["ReferenceSolution", checkpoint,
                 {"class_path": "sdlit.callbacks.HFExport", "init_args": {"dirpath": str(tmp / "merged")}},
                 {"class_path": "sdlit.callbacks.HFExport",
                  "init_args": {"dirpath": str(tmp / "adapter"), "merge_lora": False}}]
    config = quantized_config(tmp, tiny_model_dir, "nf4", callbacks=callbacks,
                              extra_trainer={"enable_checkpointing": True})
    with pytest.warns(UserWarning, match="4-bit rounding"):
        cli = run_cli(["fit", "--config", config])
    return tmp, cli


IDS = torch.tensor([[5, 17, 42, 99, 3, 7, 60, 61]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_export_of_a_4bit_run_matches_the_quantized_model(exported):
    tmp, cli = exported
    info = json.loads((tmp / "merged" / "sdlit_export.json").read_text())
    assert info["merged_lora"] is True and info["adapter_only"] is False and info["quantization"] == "nf4"
    assert info["source"] == cli.trainer.checkpoint_callback.best_model_path and info["step"] == 2
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()
    assert not is_quantized(merged) and not any("lora" in n for n, _ in merged.named_parameters())
    assert getattr(merged.config, "quantization_config", None) is None
    # The de-quantised base weights are exactly what the 4-bit layers multiply by (fp32 compute dtype), so the two
    # differ only by the fp32 rounding of W + scaling * B @ A against the separate adapter path.
    torch.testing.assert_close(logits(merged), logits(cli.model.model.eval()), atol=1e-5, rtol=1e-4)
    out = merged.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == IDS.shape[1] + 4


def test_adapter_only_export_of_a_4bit_run_holds_the_checkpoint_adapter(exported, tiny_model_dir):
    tmp, cli = exported
    from safetensors.torch import load_file

    assert (tmp / "adapter" / "adapter_config.json").exists()
    assert not (tmp / "adapter" / "model.safetensors").exists()
    saved = load_file(tmp / "adapter" / "adapter_model.safetensors")
    live = {n.replace(".default", ""): p for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert saved.keys() == live.keys() and all(torch.equal(saved[n], live[n]) for n in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp / "adapter").eval()  # full-precision base + the adapter
    assert reloaded.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] > IDS.shape[1]


def test_export_leaves_the_quantized_training_model_alone(tiny_model_dir, tmp_path):
    module = quantized_module(tiny_model_dir, "int8")
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    with pytest.warns(UserWarning, match="8-bit rounding"):
        export_hf(module, tmp_path / "bf16", merged_dtype="bfloat16")
    after = dict(module.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before) and is_quantized(module.model)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").eval()
    assert merged.dtype == torch.bfloat16


def test_merged_export_of_an_8bit_run_matches_within_int8_rounding(tiny_model_dir, tmp_path):
    module = quantized_module(tiny_model_dir, "int8")
    with pytest.warns(UserWarning, match="8-bit rounding"):
        export_hf(module, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = logits(module.model.eval())
    # bitsandbytes' int8 layers also round their *inputs*: to fp16, then to int8 per row (steps of max|x| / 127);
    # the merged model multiplies the same de-quantised weights by unrounded fp32 inputs. Errors of a few
    # int8 steps relative to the logits' scale are that input rounding; a wrong weight would be off by the scale.
    scale = float(expected.abs().max())
    torch.testing.assert_close(logits(merged), expected, atol=3 * scale / 127, rtol=0)
    wrong_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # base without the adapter
    assert (logits(wrong_base) - expected).abs().max() > 3 * scale / 127


def test_quantization_without_lora_is_one_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        SelfDistillationModule(model=tiny_model_dir, lora=None, quantization="nf4")


@pytest.mark.parametrize("settings,message", [
    ({"quantization": "nf3"}, "quantization must be one of nf4, fp4, int8"),
    ({"optimizer": "sgd"}, "optimizer must be one of adamw, adamw_8bit, paged_adamw_8bit"),
    ({"quantization": "nf4", "quantization_compute_dtype": "float33"}, "quantization_compute_dtype must name"),
])
def test_unknown_quantization_settings_are_clear_errors(tiny_model_dir, settings, message):
    with pytest.raises(ValueError, match=message):
        SelfDistillationModule(model=tiny_model_dir, lora=LORA, **settings)


def test_cli_rejects_an_unknown_quantization_kind(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", quantized_config(tmp_path, tiny_model_dir, "nf3")])
    assert "nf3" in capsys.readouterr().err


def test_unknown_merged_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="merged_dtype must name a torch dtype"):
        HFExport(merged_dtype="float33")


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_settings_reach_the_layers(tiny_model_dir, kind):
    module = quantized_module(tiny_model_dir, kind, quantization_compute_dtype="bfloat16", double_quantization=False)
    layer = module.model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert layer.weight.quant_state.quant_type == kind
    assert layer.compute_dtype == torch.bfloat16
    assert layer.weight.quant_state.nested is False
