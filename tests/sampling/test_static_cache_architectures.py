"""sdlit's static-cache sampler on non-Llama models, which decode through the model's own forward.

Greedy tokens of a left-padded batch must equal `generate` on each prompt alone. Row 0 is the shortest prompt on
purpose: without a ``cache_position``, transformers 4.5x derives the cache columns from ``cache.get_seq_length()``,
which counts the non-zero keys of row 0 (zero on its padding columns after a length-group prefill, and after a
padded one where the pad token's embedding is zero), so the sampler has to pass the cache positions itself.
"""

from __future__ import annotations

import pytest
import torch

from sdlit.sampling import cut_at_eos, sample_responses
from sdlit.sampling.llama_step import supports_llama_step
from sdlit.sampling.static_cache import sample_with_static_cache, supports_static_cache
from sdlit.scoring import group_by_length
from sdlit.settings import SamplingSettings

from conftest import build_tokenizer

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 2,
         "pad_token_id": 0, "tie_word_embeddings": False, "initializer_range": 0.1}  # larger weights: context matters
EVEN = [[12, 13], [5, 6, 7, 8, 9, 10, 11], [14, 15, 16, 17], [40, 41, 42, 43, 44]]  # one padded prefill
UNEVEN = [list(range(7, 10)), list(range(5, 160)), list(range(9, 14)), list(range(7, 150))]  # length groups
MAX_NEW_TOKENS = 12


def tiny(architecture: str):
    """A 2-layer random model of ``architecture`` (the sizes of ``conftest.build_tiny_model``), in eval mode."""
    import transformers

    config_class = getattr(transformers, f"{architecture}Config")
    model_class = getattr(transformers, f"{architecture}ForCausalLM")
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=len(build_tokenizer()), **SIZES)).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=["Qwen3", "Qwen2", "Gemma"])
def model(request):
    return tiny(request.param)


def one_by_one(model, prompts: list[list[int]], eos: set[int]) -> list[list[int]]:
    """Independent reference: greedy `generate` on each prompt alone (no padding, no batching)."""
    out = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0, eos_token_id=sorted(eos))
        out.append(cut_at_eos(ids[0, len(prompt):].tolist(), eos))
    return out


def test_the_models_decode_through_their_own_forward_with_a_static_cache(model):
    assert supports_static_cache(model) and not supports_llama_step(model)


@pytest.mark.parametrize("prompts", [EVEN, UNEVEN], ids=["padded-prefill", "length-groups"])
def test_greedy_matches_generate_when_row_0_is_the_shortest_prompt(model, prompts):
    lengths = [len(p) for p in prompts]
    assert lengths[0] == min(lengths) and len(set(lengths)) == len(lengths)
    assert len(group_by_length(lengths, [0] * len(lengths))) == (1 if prompts is EVEN else 2)
    expected = one_by_one(model, prompts, {2})
    assert all(len(r) == MAX_NEW_TOKENS for r in expected), "the test needs rows that decode every step"
    got = sample_with_static_cache(model, prompts, {2}, pad_id=0, n=2, temperature=0.0,
                                   max_new_tokens=MAX_NEW_TOKENS)
    assert got == [r for r in expected for _ in range(2)]


def test_rows_dropped_mid_decode_keep_their_cache_positions(model):
    """EOS ids that end rows 0 and 2 early: the rows left after compaction (row 0 gone) still decode right."""
    free = one_by_one(model, UNEVEN, {2})
    eos = {free[0][3], free[2][5]}
    expected = one_by_one(model, UNEVEN, eos)
    assert len({len(r) for r in expected}) > 1, "the test needs rows that end at different steps"
    got = sample_with_static_cache(model, UNEVEN, eos, pad_id=0, temperature=0.0, max_new_tokens=MAX_NEW_TOKENS,
                                   compact_fraction=0.0)
    assert got == expected


def test_sample_responses_with_the_static_cache_sampler_matches_generate(model):
    tokenizer = build_tokenizer()
    expected = one_by_one(model, UNEVEN, {2})
    got = sample_responses(model, tokenizer, UNEVEN, n=2, sampler="static_cache",
                           settings=SamplingSettings(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
    assert got == [r for r in expected for _ in range(2)]
