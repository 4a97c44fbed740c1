"""Sampling answers from the live solver: the one entry point of rollouts and held-out samples.

:func:`sample_rollouts` turns problems into :class:`~sdlit.rollout.Rollout` objects; :func:`sample_responses`
does the decoding, with sdlit's static-cache loop (:mod:`sdlit.sampling.static_cache`, the default) or plain
``model.generate``. Both sample from the same distribution and cut each answer after its first EOS (kept).
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sdlit.prompts import student_prompt_ids
from sdlit.rollout import Rollout
from sdlit.sampling.static_cache import left_pad, sample_with_static_cache, supports_static_cache
from sdlit.settings import SamplingSettings
from sdlit.sharding import gathered_weights
from sdlit.tasks.base import Problem

Sampler = Literal["static_cache", "generate", "vllm"]
SAMPLERS = ("static_cache", "generate", "vllm")


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    n: int = 1,
    settings: SamplingSettings | None = None,
    sampler: Sampler = "static_cache",
    llama_step: bool = True,
    engine=None,
) -> list[list[int]]:
    """Sample ``n`` responses per prompt in one batch; returns n*len(prompts) id lists.

    Responses are grouped by prompt (all n of prompt 0 first) and cut after the first EOS, which is kept.
    ``settings.temperature == 0`` decodes greedily, once per prompt, and repeats the answer ``n`` times.
    ``sampler``: ``static_cache`` (each prompt prefilled once, a KV cache sized once, finished rows dropped; models
    that cannot take a static cache use ``generate``) or ``generate`` (plain ``model.generate``). ``llama_step``:
    the static-cache loop decodes Llama models with the lean step (:mod:`sdlit.sampling.llama_step`); off, every
    decode step goes through the model's own forward. ``vllm``: ``engine`` (a
    :class:`~sdlit.sampling.vllm_engine.VLLMEngine` already synced with ``model``'s weights) decodes.
    """
    settings = settings or SamplingSettings()
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    greedy = settings.temperature <= 0
    if sampler == "vllm":
        if engine is None:
            raise ValueError("sampler 'vllm' needs the engine: engine=sdlit.sampling.vllm_engine.engine_for(...), "
                             "synced with the model's weights")
        responses = engine.generate(prompts, n, settings, eos_ids(model, tokenizer))
        return responses if not greedy else [list(r) for r in responses for _ in range(n)]
    was_training = model.training
    model.eval()
    try:
        with gathered_weights(model):  # sharded (FSDP2): the decode loop reads every layer's weights
            responses = _decode(model, tokenizer, prompts, n, settings, sampler, llama_step)
    finally:
        model.train(was_training)
    if not greedy:
        return responses
    return [list(r) for r in responses for _ in range(n)]


def _decode(model, tokenizer, prompts, n: int, settings: SamplingSettings, sampler: Sampler, llama_step: bool):
    """The responses of ``sampler`` (greedy: one per prompt)."""
    greedy = settings.temperature <= 0
    if sampler == "static_cache" and supports_static_cache(model):
        return sample_with_static_cache(
            model, prompts, eos_ids(model, tokenizer), tokenizer.pad_token_id, n=1 if greedy else n,
            temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
            llama_step=llama_step,
        )
    return _sample_with_generate(model, tokenizer, prompts, n, settings)


def _sample_with_generate(model, tokenizer, prompts, n: int, settings: SamplingSettings) -> list[list[int]]:
    """Plain ``model.generate`` on the left-padded batch (greedy: one answer per prompt)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    sampling = settings.temperature > 0
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=0 if sampling else None,
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=n if sampling else 1,
        pad_token_id=tokenizer.pad_token_id,
    )
    stop = eos_ids(model, tokenizer)
    return [cut_at_eos(row.tolist(), stop) for row in output[:, input_ids.shape[1] :]]


def sample_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    n: int = 1,
    settings: SamplingSettings | None = None,
    policy_version: int = 0,
    template_kwargs: dict | None = None,
    sampler: Sampler = "static_cache",
    llama_step: bool = True,
    engine=None,
) -> list[Rollout]:
    """Sample ``n`` rollouts per problem from the live solver; rollouts of problem i have ``group == i``.

    ``template_kwargs`` go to the chat template of the student prompt (e.g. ``enable_thinking``); ``settings``,
    ``sampler``, ``llama_step`` and ``engine`` as in :func:`sample_responses`.
    """
    prompts = [student_prompt_ids(tokenizer, p.question, **(template_kwargs or {})) for p in problems]
    responses = sample_responses(model, tokenizer, prompts, n, settings, sampler, llama_step, engine)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [
        Rollout(
            problem=problems[i // n],
            prompt_ids=prompts[i // n],
            response_ids=ids,
            response=text,
            policy_version=policy_version,
            group=i // n,
        )
        for i, (ids, text) in enumerate(zip(responses, texts, strict=False))
    ]


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end an answer: the model's generation config EOS ids plus the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def cut_at_eos(ids: list[int], stop: set[int]) -> list[int]:
    """``ids`` up to and including the first id in ``stop`` (all of them when none is)."""
    for i, token in enumerate(ids):
        if token in stop:
            return ids[: i + 1]
    return ids
