"""Rollouts: answers sampled from the live solver, batched, with a KV cache, plus their annotations.

A :class:`Rollout` is one sampled answer to one problem. It keeps the exact token ids that were sampled, so the
teacher and student passes score the very same tokens (the response is never re-tokenized), and the policy
version (global step) that produced it. Feedback callbacks fill in ``reward``, ``context`` and ``feedback``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sdlit.generation import left_pad, sample_with_static_cache, supports_static_cache
from sdlit.prompts import student_prompt_ids
from sdlit.steps import split_steps, step_token_spans, token_char_ends
from sdlit.tasks.base import Problem

log = logging.getLogger(__name__)

Sampler = Literal["static_cache", "generate"]


@dataclass
class Rollout:
    """One sampled answer and what feedback said about it.

    Attributes:
        problem: The problem it answers.
        prompt_ids: Token ids of the student prompt it was sampled from.
        response_ids: Sampled token ids (EOS included when the model stopped).
        response: The decoded response text.
        policy_version: Global step of the weights that sampled it.
        group: Index of its problem within the batch; rollouts of one problem share it (GRPO groups).
        correct: Whether its final answer matches the gold answer.
        reward: Scalar reward set by a feedback callback (e.g. 1.0 / 0.0).
        context: Teacher context set by a feedback callback (reference solution, critique, ...).
        context_header: The line introducing ``context`` in the teacher prompt.
        feedback: Free-form annotations of feedback callbacks (critique case, first error, ...).
        logprobs: Per-token log-probs under the sampling policy, when known (offline data).
        step_spans: Token span ``[start, end)`` in ``response_ids`` of each step of ``split_steps(response)``
            (see :func:`tag_step_spans`); None until tagged.
    """

    problem: Problem
    prompt_ids: list[int]
    response_ids: list[int]
    response: str
    policy_version: int = 0
    group: int = 0
    correct: bool | None = None
    reward: float | None = None
    context: str | None = None
    context_header: str = "Feedback:"
    feedback: dict[str, Any] = field(default_factory=dict)
    logprobs: list[float] | None = None
    step_spans: list[tuple[int, int]] | None = None


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    sampler: Sampler = "static_cache",
) -> list[list[int]]:
    """Sample ``n`` responses per prompt in one batch; returns n*len(prompts) id lists.

    Responses are grouped by prompt (all n of prompt 0 first) and cut after the first EOS, which is kept.
    ``temperature == 0`` decodes greedily, once per prompt, and repeats the answer ``n`` times.
    ``sampler``: ``static_cache`` (:mod:`sdlit.generation`: each prompt prefilled once, a KV cache sized once,
    finished rows dropped; models that cannot take a static cache use ``generate``) or ``generate`` (plain
    ``model.generate``).
    """
    if sampler not in ("static_cache", "generate"):
        raise ValueError(f"sampler must be 'static_cache' or 'generate', got {sampler!r}")
    was_training = model.training
    model.eval()
    try:
        if sampler == "static_cache" and supports_static_cache(model):
            greedy = temperature <= 0
            responses = sample_with_static_cache(
                model, prompts, _eos_ids(model, tokenizer), tokenizer.pad_token_id, n=1 if greedy else n,
                temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            )
        else:
            responses = _sample_with_generate(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens)
    finally:
        model.train(was_training)
    if temperature > 0:
        return responses
    return [list(r) for r in responses for _ in range(n)]


def _sample_with_generate(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens) -> list[list[int]]:
    """Plain ``model.generate`` on the left-padded batch (greedy: one answer per prompt)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n if temperature > 0 else 1,
        pad_token_id=tokenizer.pad_token_id,
    )
    eos_ids = _eos_ids(model, tokenizer)
    return [_cut_at_eos(row.tolist(), eos_ids) for row in output[:, input_ids.shape[1] :]]


def sample_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    policy_version: int = 0,
    template_kwargs: dict | None = None,
    sampler: Sampler = "static_cache",
) -> list[Rollout]:
    """Sample ``n`` rollouts per problem from the live solver; rollouts of problem i have ``group == i``.

    ``template_kwargs`` go to the chat template of the student prompt (e.g. ``enable_thinking``); ``sampler``
    as in :func:`sample_responses`.
    """
    prompts = [student_prompt_ids(tokenizer, p.question, **(template_kwargs or {})) for p in problems]
    responses = sample_responses(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, sampler)
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
        for i, (ids, text) in enumerate(zip(responses, texts))
    ]


def tag_step_spans(rollout: Rollout, tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    """Record (and return) the token span of every step of the rollout, mapped from the steps' character
    spans through the decoded ``response_ids`` (the ids are never re-tokenized)."""
    text = tokenizer.decode(rollout.response_ids, skip_special_tokens=True)
    if text != rollout.response:  # e.g. offline text that does not decode back verbatim: steps of the ids' text
        log.debug("rollout of %s: response text differs from its decoded ids; steps follow the ids", rollout.problem.id)
    ends = token_char_ends(tokenizer, rollout.response_ids, text)
    rollout.step_spans = step_token_spans(split_steps(text), ends)
    return rollout.step_spans


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    return ids
