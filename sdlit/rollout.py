"""Rollout: one answer of the solver to one problem, its exact token ids and what feedback said about it.

A :class:`Rollout` is one sampled answer to one problem. It keeps the exact token ids that were sampled, so the
teacher and student passes score the very same tokens (the response is never re-tokenized), and the policy
version (global step) that produced it. Feedback callbacks fill in ``reward``, ``context`` and ``feedback``.
Sampled rollouts come from :mod:`sdlit.sampling`; given text (offline rows, reference solutions, an answer to
analyse) becomes a rollout through :meth:`Rollout.from_text`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdlit.prompts import student_prompt_ids
from sdlit.steps import split_steps, step_token_spans, token_char_ends
from sdlit.tasks.base import Problem

log = logging.getLogger(__name__)

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

    @classmethod
    def from_text(
        cls,
        problem: Problem,
        response: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        finished: bool = True,
        template_kwargs: dict | None = None,
        **fields: Any,
    ) -> Rollout:
        """A rollout whose response is given as text: tokenized here, once, and never again.

        ``finished``: the answer ended, so the tokenizer's EOS is appended to its ids (as a sampled answer that
        stopped keeps its EOS). The prompt is the student prompt of ``problem`` (``template_kwargs`` go to the
        chat template). ``fields`` set any other attribute (``policy_version``, ``group``, ``reward``, ...).
        """
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if finished and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        prompt_ids = student_prompt_ids(tokenizer, problem.question, **(template_kwargs or {}))
        return cls(problem=problem, prompt_ids=prompt_ids, response_ids=ids, response=response, **fields)


def tag_step_spans(rollout: Rollout, tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    """Record (and return) the token span of every step of the rollout, mapped from the steps' character
    spans through the decoded ``response_ids`` (the ids are never re-tokenized)."""
    text = tokenizer.decode(rollout.response_ids, skip_special_tokens=True)
    if text != rollout.response:  # e.g. offline text that does not decode back verbatim: steps of the ids' text
        log.debug("rollout of %s: response text differs from its decoded ids; steps follow the ids", rollout.problem.id)
    ends = token_char_ends(tokenizer, rollout.response_ids, text)
    rollout.step_spans = step_token_spans(split_steps(text), ends)
    return rollout.step_spans
