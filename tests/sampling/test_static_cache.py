"""sdlit's decode loop (static cache, prefill once per prompt, finished rows dropped) against `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdlit.sampling import cut_at_eos, sample_responses
from sdlit.sampling.static_cache import sample_with_static_cache, supports_static_cache
from sdlit.settings import SamplingSettings

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def one_by_one(model, eos: set[int], max_new_tokens: int) -> list[list[int]]:
    """Independent reference: greedy `generate` on each prompt alone (no padding, no batching)."""
    out = []
    for prompt in PROMPTS:
        ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=0, eos_token_id=sorted(eos))
        out.append(cut_at_eos(ids[0, len(prompt):].tolist(), eos))
    return out


def test_the_tiny_model_can_take_a_static_cache(model):
    assert supports_static_cache(model)


@pytest.mark.parametrize("compact_fraction", [0.0, 0.25, 1.0])
def test_greedy_matches_generate_while_rows_end_at_different_steps(model, compact_fraction):
    free = one_by_one(model, {2}, 12)  # without early EOS: pick EOS ids that end rows at different steps
    eos = {free[0][3], free[1][6]}
    expected = one_by_one(model, eos, 12)
    lengths = sorted(len(r) for r in expected)
    assert lengths[0] < lengths[-1], "the test needs rows that end at different steps"
    got = sample_with_static_cache(model, PROMPTS, eos, pad_id=0, n=2, temperature=0.0, max_new_tokens=12,
                                   compact_fraction=compact_fraction)
    assert got == [r for r in expected for _ in range(2)]


def test_sampling_follows_the_models_distribution(model):
    """First sampled token: frequencies over many rows match softmax(logits / T) of the prompt."""
    prompt = PROMPTS[0]
    torch.manual_seed(0)
    rows = sample_with_static_cache(model, [prompt], eos_ids={2}, pad_id=0, n=4000, temperature=0.7,
                                    max_new_tokens=1)
    counts = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=model.config.vocab_size).float()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / 0.7, dim=-1)
    assert (counts / len(rows) - probs).abs().max() < 0.03


def test_top_p_keeps_only_the_nucleus(model):
    prompt = PROMPTS[1]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], dim=-1)
    top = probs.sort(descending=True)
    keep = int((top.values.cumsum(0) < 0.3).sum()) + 1  # smallest prefix reaching 0.3
    allowed = set(top.indices[:keep].tolist())
    torch.manual_seed(1)
    rows = sample_with_static_cache(model, [prompt], eos_ids={2}, pad_id=0, n=300, top_p=0.3, max_new_tokens=1)
    assert {r[0] for r in rows} <= allowed


def test_sample_responses_uses_either_sampler_with_the_same_layout(model, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for sampler in ("static_cache", "generate"):
        torch.manual_seed(0)
        out = sample_responses(model, tokenizer, PROMPTS[:2], n=3, sampler=sampler,
                               settings=SamplingSettings(max_new_tokens=5))
        assert len(out) == 6 and all(1 <= len(r) <= 5 for r in out)
    greedy = [sample_responses(model, tokenizer, PROMPTS, n=2, sampler=s,
                               settings=SamplingSettings(temperature=0.0, max_new_tokens=6))
              for s in ("static_cache", "generate")]
    assert greedy[0] == greedy[1]
    with pytest.raises(ValueError, match="sampler"):
        sample_responses(model, tokenizer, PROMPTS, sampler="vllm")


# Prompts of very different lengths: the prefill runs in length groups (one padded pass would be mostly padding)
UNEVEN = [list(range(5, 8)), list(range(5, 160)), list(range(9, 14)), list(range(7, 150))]


def test_prompts_of_very_different_lengths_are_prefilled_in_length_groups(model):
    """The grouped prefill gives the logits and the cache entries of one padded pass, and greedy decoding from it
    gives each prompt's tokens decoded alone."""
    from transformers import StaticCache

    from sdlit.sampling.static_cache import _forward, _forward_arguments, _prefill, left_pad
    from sdlit.scoring import group_by_length

    ids, mask = left_pad(UNEVEN, pad_id=0)
    assert len(group_by_length(mask.sum(1).tolist(), [0] * len(UNEVEN))) == 2
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    caches = [StaticCache(config=model.config, max_cache_len=ids.shape[1] + 2) for _ in range(2)]
    with torch.no_grad():
        arguments = _forward_arguments(model)
        grouped = _prefill(model, arguments, caches[0], ids, mask, positions)
        padded = _forward(model, arguments, caches[1], ids, mask, positions, torch.arange(ids.shape[1]))
    torch.testing.assert_close(grouped, padded, atol=1e-5, rtol=1e-4)
    real, width = mask.bool()[:, None, :, None], ids.shape[1]
    for ours, reference in zip(caches[0].layers, caches[1].layers, strict=False):
        if hasattr(ours, "cumulative_length"):  # transformers 5.x: the layer counts the columns written
            assert int(ours.get_seq_length()) == int(reference.get_seq_length()) == width
        for a, b in ((ours.keys, reference.keys), (ours.values, reference.values)):
            torch.testing.assert_close(a[:, :, :width] * real, b[:, :, :width] * real, atol=1e-5, rtol=1e-4)
            assert not a[:, :, width:].any()  # nothing written past the prompt columns

    expected = []
    for prompt in UNEVEN:  # independent reference: each prompt alone, no padding
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, pad_token_id=0,
                             eos_token_id=[2])
        expected.append(cut_at_eos(out[0, len(prompt):].tolist(), {2}))
    assert sample_with_static_cache(model, UNEVEN, {2}, pad_id=0, temperature=0.0, max_new_tokens=6) == expected


def test_caches_with_sliding_window_layers_get_one_padded_prefill(monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM, StaticCache

    import sdlit.sampling.static_cache as generation
    from sdlit.sampling.static_cache import _plain_static_layers

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    sliding = MistralForCausalLM(config).eval()
    assert not _plain_static_layers(StaticCache(config=config, max_cache_len=32), sliding)
    widths, forward = [], generation._forward
    monkeypatch.setattr(generation, "_forward", lambda m, a, c, ids, *rest: widths.append(ids.shape) or forward(
        m, a, c, ids, *rest))
    got = sample_with_static_cache(sliding, [list(range(3, 6)), list(range(3, 60))], {2}, pad_id=0,
                                   temperature=0.0, max_new_tokens=4)
    assert widths[0] == (2, 57) and all(w[1] == 1 for w in widths[1:])  # one padded prefill, then decode steps
    assert all(1 <= len(r) <= 4 for r in got)


@pytest.mark.slow
def test_greedy_tokens_are_the_argmax_of_a_full_forward_pass_on_the_packaged_model():
    """SmolLM2, three GSM8K prompts of different lengths in one batch: each greedy token of sdlit's loop is
    (within float noise) the argmax of an independent forward pass over the unpadded prompt + response."""
    from sdlit.models import load_model, load_tokenizer
    from sdlit.prompts import student_prompt_ids
    from sdlit.tasks.gsm8k import GSM8K

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct").eval()
    prompts = [student_prompt_ids(tokenizer, p.question) for p in GSM8K(train_size=3).train_problems()]
    assert len({len(p) for p in prompts}) == 3
    responses = sample_with_static_cache(model, prompts, {tokenizer.eos_token_id}, tokenizer.pad_token_id,
                                         temperature=0.0, max_new_tokens=24)
    for prompt, response in zip(prompts, responses, strict=False):
        assert len(response) > 0
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        chosen = logits.gather(1, torch.tensor(response)[:, None]).squeeze(1)
        assert (logits.max(dim=1).values - chosen).max() < 1e-3
