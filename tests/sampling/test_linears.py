"""Decode-time linears (LoRA merged, oneDNN-packed on CPU) and inverse-CDF sampling, against the model's own forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sdlit.sampling.linears import decoding_linears, mkldnn_packing_available
from sdlit.sampling.static_cache import sample_categorical, sample_with_static_cache

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 13, 14, 15, 16]])


def lora_model(tiny_model_dir, **lora):
    """The tiny Llama with a LoRA adapter whose B is non-zero, so that merging changes the weights."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("pack", [True, False])
def test_merged_linears_give_the_adapters_output(tiny_model_dir, pack):
    model = lora_model(tiny_model_dir)
    expected = logits(model)
    with model.disable_adapter():
        base_only = logits(model)
    assert (expected - base_only).abs().max() > 1e-2, (
        "the adapter must change the output for this test to mean anything")
    with decoding_linears(model, rows=2, pack=pack) as switched:
        got = logits(model)
    layers = model.base_model.model.config.num_hidden_layers
    assert switched == 7 * layers + 1  # q k v o gate up down per layer, and the output head
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_the_model_is_back_as_it_was_after_the_block_even_after_an_error(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    expected = logits(model)
    with pytest.raises(RuntimeError, match="inside"):
        with decoding_linears(model, rows=2):
            raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)
    # the adapter still trains: its weights get gradients through the class forward again
    model.train()
    model(input_ids=IDS).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_a_dora_layer_keeps_its_own_forward(tiny_model_dir):
    model = lora_model(tiny_model_dir, use_dora=True)
    expected = logits(model)
    with decoding_linears(model, rows=2) as switched:
        got = logits(model)
    assert switched == 1  # only the output head, which has no adapter
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_packing_is_available_on_this_cpu_build():
    assert mkldnn_packing_available()


def test_greedy_decoding_is_the_same_with_and_without_the_fast_linears(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    prompts = [[5, 6, 7, 8, 9], [12, 13]]
    slow = sample_with_static_cache(model, prompts, {2}, 0, n=2, temperature=0.0, max_new_tokens=10, fast_linears=False)
    fast = sample_with_static_cache(model, prompts, {2}, 0, n=2, temperature=0.0, max_new_tokens=10)
    assert fast == slow


def test_inverse_cdf_sampling_draws_each_entry_in_proportion_and_never_a_zero():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 6.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0, 5.0]])  # rows not normalised
    torch.manual_seed(0)
    draws = torch.stack([sample_categorical(weights) for _ in range(20000)])
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=6).double() / len(draws)
        expected = weights[row].double() / weights[row].sum()
        assert (freq - expected).abs().max() < 0.012
        assert freq[expected == 0].sum() == 0


def test_inverse_cdf_sampling_draws_the_last_entry_and_handles_a_one_hot_row():
    weights = torch.zeros(3, 5)
    weights[0, 4] = 1.0  # only the last entry
    weights[1, 0] = 2.0  # only the first entry
    weights[2] = 1e-30  # tiny but equal
    torch.manual_seed(0)
    draws = torch.stack([sample_categorical(weights) for _ in range(500)])
    assert (draws[:, 0] == 4).all() and (draws[:, 1] == 0).all()
    assert set(draws[:, 2].tolist()) == set(range(5))
