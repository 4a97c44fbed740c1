"""Prompts: what the student sees (the question) and what the self-teacher sees (question plus feedback).

Both go through the model's chat template when it has one, so any instruction-tuned HF model works; a
model without a template gets a plain "Question/Answer" layout. The teacher prompt is built from pieces so
that a feedback context that does not fit the window is cut, never the question or the response.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sdlit.steps import STEP_FORMAT_INSTRUCTION

_CONTEXT_SLOT = "\x00SDLIT_CONTEXT\x00"


@dataclass(frozen=True)
class TeacherPrompt:
    """Token ids of a teacher prompt and whether its feedback context had to be shortened."""

    ids: list[int]
    truncated: bool


def student_message(question: str) -> str:
    """The user message of the student: the step-format instruction and the problem."""
    return f"{STEP_FORMAT_INSTRUCTION}\n\nProblem: {question}"


def teacher_message(question: str, context: str, header: str) -> str:
    """The user message of the self-teacher: the student's message followed by the feedback context."""
    return f"{student_message(question)}\n\n{header}\n{context}\n\nNow write your own solution in the same format."


def render(tokenizer: PreTrainedTokenizerBase, message: str, **template_kwargs) -> str:
    """Render one user turn with the chat template (generation prompt added), or a plain layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    return f"Question: {message}\nAnswer:"


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of rendered text (the chat template already carries any special tokens it needs)."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def student_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, **template_kwargs) -> list[int]:
    """Token ids of the student prompt for ``question``."""
    return encode(tokenizer, render(tokenizer, student_message(question), **template_kwargs))


def teacher_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    context: str,
    header: str,
    max_tokens: int,
    **template_kwargs,
) -> TeacherPrompt:
    """Token ids of the teacher prompt, at most ``max_tokens`` long by cutting the end of ``context``."""
    text = render(tokenizer, teacher_message(question, _CONTEXT_SLOT, header), **template_kwargs)
    before, after = text.split(_CONTEXT_SLOT)
    before_ids = encode(tokenizer, before)
    after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    budget = max(0, max_tokens - len(before_ids) - len(after_ids))
    truncated = len(context_ids) > budget
    return TeacherPrompt(before_ids + context_ids[:budget] + after_ids, truncated)
