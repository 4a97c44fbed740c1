"""The lean Llama decode step against the model's own full forward (no cache), and its use by the sampler."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, StaticCache

import sdlit.sampling.static_cache as generation
from sdlit.sampling.llama_step import LlamaDecodeStep, supports_llama_step
from sdlit.sampling.static_cache import left_pad, sample_with_static_cache

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]  # left-padded to different widths


def llama(attention_bias=False, tie=False, rope=None, lora=True, **lora_settings):
    """A random 2-layer Llama with grouped-query attention and, by default, a LoRA adapter whose B is non-zero."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attention_bias=attention_bias, tie_word_embeddings=tie,
        pad_token_id=0, eos_token_id=2, **({"rope_scaling": rope} if rope else {}),
    )
    model = LlamaForCausalLM(config)
    if not lora:
        return model.eval()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora_settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def full_forward_logits(model, rows: list[list[int]]) -> torch.Tensor:
    """Last-position logits of left-padded rows, one forward over all tokens, no cache: the reference."""
    ids, mask = left_pad(rows, 0)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(attention_bias=True, tie=True),
        dict(rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}),
        dict(lora=False),
    ],
    ids=["lora", "bias-tied", "llama3-rope", "no-adapter"],
)
@pytest.mark.parametrize("pack", [True, False])
def test_decode_steps_give_the_logits_of_a_full_forward(settings, pack):
    model = llama(**settings)
    assert supports_llama_step(model)
    ids, mask = left_pad(PROMPTS, 0)
    batch, width = ids.shape
    steps = 6
    cache = StaticCache(config=model.config, max_cache_len=width + steps)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache_argument = generation._cache_argument(model)  # `past_key_values` in transformers 4.x
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_argument: cache})
    step = LlamaDecodeStep(model, rows=batch, pack=pack)
    attention = torch.cat([mask, torch.zeros(batch, steps, dtype=torch.long)], dim=1)
    rows = [list(p) for p in PROMPTS]
    next_position = positions[:, -1] + 1
    generator = torch.Generator().manual_seed(1)
    for t in range(steps):
        tokens = torch.randint(3, 64, (batch,), generator=generator)
        for row, token in zip(rows, tokens.tolist(), strict=False):
            row.append(token)
        attention[:, width + t] = 1
        got = step(cache, tokens, next_position, attention, width + t)
        torch.testing.assert_close(got, full_forward_logits(model, rows), atol=1e-4, rtol=1e-4)
        next_position = next_position + 1


def test_the_adapter_is_in_the_decode_step():
    model = llama()
    ids, mask = left_pad(PROMPTS, 0)
    with model.disable_adapter():
        base_only = full_forward_logits(model, PROMPTS)
    assert (full_forward_logits(model, PROMPTS) - base_only).abs().max() > 1e-2  # so the test above means something


def test_only_exact_llama_models_are_supported():
    assert supports_llama_step(llama(lora=False))
    assert supports_llama_step(llama())
    assert not supports_llama_step(llama(use_dora=True))  # DoRA cannot be merged into one weight
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert not supports_llama_step(gpt2)


def test_the_sampler_decodes_with_the_lean_step_and_samples_what_the_model_forward_samples(monkeypatch):
    model = llama()
    calls = []
    original_call = LlamaDecodeStep.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecodeStep, "__call__", counted)
    kwargs = dict(eos_ids={2, 7}, pad_id=0, n=3, max_new_tokens=12, compact_fraction=0.0)  # rows drop out as they end
    greedy = sample_with_static_cache(model, PROMPTS, temperature=0.0, **kwargs)
    torch.manual_seed(3)
    sampled = sample_with_static_cache(model, PROMPTS, temperature=1.0, **kwargs)
    assert calls, "the lean decode step must be used for a Llama model"
    calls.clear()
    assert sample_with_static_cache(model, PROMPTS, temperature=0.0, llama_step=False, **kwargs) == greedy
    torch.manual_seed(3)
    assert sample_with_static_cache(model, PROMPTS, temperature=1.0, llama_step=False, **kwargs) == sampled
    assert not calls
