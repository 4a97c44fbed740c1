"""Rollout sampling: batching, grouping, EOS handling and greedy decoding on a tiny model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdlit.prompts import student_prompt_ids
from sdlit.sampling import cut_at_eos, sample_responses, sample_rollouts
from sdlit.sampling.static_cache import left_pad
from sdlit.settings import SamplingSettings
from sdlit.tasks.arith import Arith


def load(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_left_pad_and_eos_cut():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_eos([4, 2, 9, 2], {2}) == [4, 2]
    assert cut_at_eos([4, 5], {2}) == [4, 5]


def test_greedy_samples_match_one_by_one_generation(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    problems = Arith(train_size=3).train_problems()
    prompts = [student_prompt_ids(tokenizer, p.question) for p in problems]
    batched = sample_responses(model, tokenizer, prompts, n=2,
                               settings=SamplingSettings(temperature=0.0, max_new_tokens=6))
    assert len(batched) == 6 and batched[0] == batched[1]  # greedy: the n samples of a prompt agree
    for i, prompt in enumerate(prompts):  # left padding changes nothing: same tokens as unbatched
        alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6,
                               pad_token_id=tokenizer.pad_token_id)
        assert batched[2 * i] == cut_at_eos(alone[0, len(prompt):].tolist(), {tokenizer.eos_token_id})


def test_rollouts_are_grouped_by_problem_and_keep_their_ids(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    problems = Arith(train_size=2).train_problems()
    torch.manual_seed(0)
    rollouts = sample_rollouts(model, tokenizer, problems, n=3, policy_version=7,
                               settings=SamplingSettings(max_new_tokens=5))
    assert [r.group for r in rollouts] == [0, 0, 0, 1, 1, 1]
    assert [r.problem for r in rollouts] == [problems[0]] * 3 + [problems[1]] * 3
    assert all(r.policy_version == 7 and 1 <= len(r.response_ids) <= 5 for r in rollouts)
    assert all(r.response == tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts)
    model.train()
    sample_rollouts(model, tokenizer, problems, n=1, settings=SamplingSettings(max_new_tokens=2))
    assert model.training, "sampling must give the model back in the mode it found it"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_sampler_without_vllm_names_the_extra():
    from sdlit.data import RolloutDataModule

    with pytest.raises(ImportError, match=r"sdlit\[vllm\]"):
        RolloutDataModule(sampler="vllm")
