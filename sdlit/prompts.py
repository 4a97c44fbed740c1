"""Prompts: what the student sees (the question) and what the self-teacher sees (question plus feedback).

Both go through the model's chat template when it has one, so any instruction-tuned HF model works; a
model without a template gets a plain "Question/Answer" layout. The teacher prompt is built from pieces so
that a feedback context that does not fit the window is cut, never the question or the response.

The teacher view rule: the response ids must follow exactly the tokens the student saw right before them.
Student and teacher may render their prompts with different chat-template arguments (the paper: student with
thinking off, teacher with thinking on), and with Qwen3-style templates the two prompts then end differently:
the student's generation prompt is ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``, the teacher's
``<|im_start|>assistant\\n``. The teacher view is therefore the teacher's own template up to and including its
generation prompt, then whatever the student's generation prompt has beyond the teacher's (here the empty
think block), then the response. Equal generation prompts append nothing. A teacher generation prompt that is
not a prefix of the student's (the teacher would open something the student never saw, or drop something it
did see) cannot be aligned: :func:`check_teacher_view` and :func:`teacher_prompt_ids` raise a ValueError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sdlit.steps import STEP_FORMAT_INSTRUCTION

log = logging.getLogger(__name__)

_CONTEXT_SLOT = "\x00SDLIT_CONTEXT\x00"
_PROBE_QUESTION = "What is 2 + 3?"
_PROBE_CONTEXT = "Step 1: 2 + 3 = 5\nAnswer: 5"
_PROBE_HEADER = "Feedback:"


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


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether prompts go through the tokenizer's chat template (else the plain "Question/Answer" layout)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: PreTrainedTokenizerBase, message: str, **template_kwargs) -> str:
    """Render one user turn with the chat template (generation prompt added), or a plain layout."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    return f"Question: {message}\nAnswer:"


def generation_prompt(tokenizer: PreTrainedTokenizerBase, message: str, **template_kwargs) -> str:
    """The text the chat template appends after the user turn ``message`` to open the answer.

    It is the render with ``add_generation_prompt=True`` minus the render without it; '' for a tokenizer
    without a chat template (student and teacher then share the plain layout's ending). A template whose render
    without the generation prompt is not a prefix of the render with it raises a ValueError.
    """
    if not has_chat_template(tokenizer):
        return ""
    opened = render(tokenizer, message, **template_kwargs)
    closed = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=False, **template_kwargs
    )
    if not opened.startswith(closed):
        raise ValueError(
            f"chat template with template_kwargs={template_kwargs!r}: the render without the generation prompt "
            f"(ending {closed[-80:]!r}) is not a prefix of the render with it (ending {opened[-80:]!r}), so the "
            "generation prompt cannot be told apart"
        )
    return opened[len(closed):]


def _view_suffix(
    tokenizer: PreTrainedTokenizerBase,
    student_text: str,
    teacher_text: str,
    student_template_kwargs: dict,
    teacher_template_kwargs: dict,
) -> str:
    """What the student's generation prompt has beyond the teacher's; ValueError when the views cannot align."""
    student_end = generation_prompt(tokenizer, student_text, **student_template_kwargs)
    teacher_end = generation_prompt(tokenizer, teacher_text, **teacher_template_kwargs)
    if not student_end.startswith(teacher_end):
        raise ValueError(
            "the teacher view cannot be aligned with the student view: with "
            f"student_template_kwargs={student_template_kwargs!r} the student prompt ends with {student_end!r}, "
            f"with teacher_template_kwargs={teacher_template_kwargs!r} the teacher prompt ends with "
            f"{teacher_end!r}. The response must follow exactly the tokens the student saw, so the teacher's "
            "generation prompt must be a prefix of the student's; give the teacher template kwargs that end its "
            "prompt like the student's or earlier (e.g. the thinking setting)"
        )
    return student_end[len(teacher_end):]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of rendered text (the chat template already carries any special tokens it needs)."""
    add_special = not has_chat_template(tokenizer)
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
    *,
    student_template_kwargs: dict | None = None,
    **template_kwargs,
) -> TeacherPrompt:
    """Token ids of the teacher prompt, at most ``max_tokens`` long by cutting the end of ``context``.

    ``template_kwargs`` go to the teacher's chat template. ``student_template_kwargs`` are the ones the student
    prompt was rendered with (``{}`` for none): the teacher prompt then ends with whatever the student's
    generation prompt has beyond the teacher's (the teacher view rule in the module docstring), and a pair that
    cannot be aligned raises a ValueError. ``None`` means the student used the teacher's kwargs: nothing is
    appended. Only the context is ever cut, never the question or the generation prompt and its suffix.
    """
    slotted = teacher_message(question, _CONTEXT_SLOT, header)
    text = render(tokenizer, slotted, **template_kwargs)
    if student_template_kwargs is not None:
        text += _view_suffix(tokenizer, student_message(question), slotted, student_template_kwargs, template_kwargs)
    before, after = text.split(_CONTEXT_SLOT)
    before_ids = encode(tokenizer, before)
    after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    budget = max(0, max_tokens - len(before_ids) - len(after_ids))
    truncated = len(context_ids) > budget
    return TeacherPrompt(before_ids + context_ids[:budget] + after_ids, truncated)


def check_teacher_view(
    tokenizer: PreTrainedTokenizerBase,
    student_template_kwargs: dict | None,
    teacher_template_kwargs: dict | None,
) -> str:
    """Check once, at the start of a run, that the teacher view can be aligned with the student's.

    Returns the text appended to every teacher prompt after the teacher's generation prompt ('' when the two
    generation prompts are equal, or without a chat template) and logs it when there is one. Raises a
    ValueError naming both template kwargs and both prompt endings when the views cannot be aligned, or when
    the last tokens of the two prompts differ although the texts align (a tokenizer merging across the end).
    """
    student_kwargs, teacher_kwargs = student_template_kwargs or {}, teacher_template_kwargs or {}
    teacher_text = teacher_message(_PROBE_QUESTION, _PROBE_CONTEXT, _PROBE_HEADER)
    suffix = _view_suffix(tokenizer, student_message(_PROBE_QUESTION), teacher_text, student_kwargs, teacher_kwargs)
    _check_last_tokens(tokenizer, student_kwargs, teacher_kwargs)
    if suffix:
        log.info("teacher prompts end with the student's generation prompt: %r appended", suffix)
    return suffix


def _check_last_tokens(tokenizer: PreTrainedTokenizerBase, student_kwargs: dict, teacher_kwargs: dict) -> None:
    """The token ids of the student's generation prompt must end the teacher prompt too."""
    end = generation_prompt(tokenizer, student_message(_PROBE_QUESTION), **student_kwargs)
    if not end:
        return
    student = student_prompt_ids(tokenizer, _PROBE_QUESTION, **student_kwargs)
    teacher = teacher_prompt_ids(
        tokenizer, _PROBE_QUESTION, _PROBE_CONTEXT, _PROBE_HEADER, 10**9,
        student_template_kwargs=student_kwargs, **teacher_kwargs,
    ).ids
    n = len(tokenizer(end, add_special_tokens=False)["input_ids"])
    if student[-n:] != teacher[-n:]:
        raise ValueError(
            f"with student_template_kwargs={student_kwargs!r} and teacher_template_kwargs={teacher_kwargs!r} the "
            f"prompts end with the same text {end!r} but different tokens: student {student[-n:]}, teacher "
            f"{teacher[-n:]}; the response would not follow the tokens the student saw"
        )
