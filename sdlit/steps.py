"""Step tagging of solver answers: "Step 1: ...", "Step 2: ...", then "Answer: X".

The solver is asked (STEP_FORMAT_INSTRUCTION) to write its work as tagged steps so that a critic can
point at the step where it went wrong. split_steps() recovers those steps with their character spans.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["STEP_FORMAT_INSTRUCTION", "Step", "has_step_tags", "split_steps", "step_token_spans", "token_char_ends"]

STEP_FORMAT_INSTRUCTION = (
    'Solve the problem step by step. Write each step on its own line as "Step 1: ...", "Step 2: ...", '
    'and so on, then finish with a line "Answer: <number>".'
)

_DECOR = r"[ \t]*(?:[#>*_][ \t]*)*"  # markdown decoration before a tag: "**", "###", "> "
# "Step 1:", "**Step 1:**", "**Step 1**:", "Step 1.", "step 1 -", "Step 1)" or a bare "Step 1" line.
_STEP_TAG = re.compile(
    _DECOR + r"step[ \t]*(\d+)[ \t]*(?:\*\*|__)?[ \t]*(?:[:.)\-–—]|(?=[ \t]*$))[ \t]*(?:\*\*|__)?[ \t]*",
    re.IGNORECASE,
)
# "Answer: X", "Final answer: X", "**Answer:** X", "The final answer is X", "#### X".
_ANSWER_TAG = re.compile(
    _DECOR + r"(?:(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*(?::|=|[ \t]is\b)[ \t]*(?:\*\*|__)?"
    r"|####)[ \t]*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Step:
    """One step of a solver answer.

    Attributes:
        index: 0-based position among the steps of the answer.
        kind: "step" for a work step, "answer" for the final answer line.
        text: the step's content without its tag ("Step k:" or "Answer:"); for an answer line, the answer
            as written (e.g. "72 clips").
        start: start of the step (tag included) in the response.
        end: end of the step's last non-blank line in the response; response[start:end] contains text.
    """

    index: int
    kind: Literal["step", "answer"]
    text: str
    start: int
    end: int


def _lines(response: str) -> list[tuple[int, int, str]]:
    """(start, end, line) of every line of the response, end excluding the newline."""
    out, pos = [], 0
    for line in response.split("\n"):
        out.append((pos, pos + len(line), line))
        pos += len(line) + 1
    return out


def has_step_tags(response: str) -> bool:
    """True when some line of the response starts with a step tag ("Step 1:", "**Step 2:**", ...)."""
    return any(_STEP_TAG.match(line) for _, _, line in _lines(response))


def _make(index: int, kind: str, response: str, start: int, content: int, end: int) -> Step:
    """A Step whose text is response[content:end] stripped; start skips leading blanks of the line."""
    start += len(response[start:end]) - len(response[start:end].lstrip())
    return Step(index, kind, response[content:end].strip(), start, end)


def split_steps(response: str) -> list[Step]:
    """Split a step-tagged answer into steps.

    A line starting with a step tag starts a step, which continues over the following lines until the
    next tag. A line "Answer: X" / "Final answer: X" / "#### X" is a separate step of kind "answer";
    untagged lines after it are ignored. Text before the first tag is ignored. When the response has no
    step tags at all, every non-blank line is one step (answer lines still become "answer" steps).
    """
    tagged = has_step_tags(response)
    steps: list[Step] = []
    open_step: list[int] | None = None  # [start, content_start, end] of the step being read

    def close() -> None:
        nonlocal open_step
        if open_step is not None:
            steps.append(_make(len(steps), "step", response, *open_step))
            open_step = None

    after_answer = False
    for start, end, line in _lines(response):
        if not line.strip():
            continue
        step_tag, answer_tag = _STEP_TAG.match(line), _ANSWER_TAG.match(line)
        if answer_tag and not step_tag:
            close()
            steps.append(_make(len(steps), "answer", response, start, start + answer_tag.end(), end))
            after_answer = True
        elif step_tag or not tagged:
            close()
            content = start + (step_tag.end() if step_tag else 0)
            open_step, after_answer = [start, content, end], False
        elif open_step is not None and not after_answer:
            open_step[2] = end
    close()
    return steps


# ---- token spans of steps --------------------------------------------------------------------------
_WINDOW = 8  # tokens decoded together to find where one token ends in the text (context for merges)


def token_char_ends(tokenizer, ids: list[int], text: str) -> list[int]:
    """For each token of ``ids``, the end (in characters) of the text it completes in ``text``.

    ``text`` is ``tokenizer.decode(ids, skip_special_tokens=True)``: token ``i`` covers
    ``text[ends[i - 1]:ends[i]]``; special tokens and bytes of a character that is not complete yet cover
    nothing. Each end comes from decoding a short window of tokens before it, checked against ``text``;
    where that check fails (partial characters, decoders that strip a leading space) the whole prefix is
    decoded instead, so the result is exact for any tokenizer. Never re-tokenizes ``text``.
    """
    windows = [ids[max(0, i - _WINDOW) : i + 1] for i in range(len(ids))]
    chunks = tokenizer.batch_decode(windows, skip_special_tokens=True)
    ends: list[int] = []
    for i, chunk in enumerate(chunks):
        low = max(0, i - _WINDOW)
        start = ends[low - 1] if low else 0
        previous = ends[-1] if ends else 0
        if "\ufffd" not in chunk and text.startswith(chunk, start) and start + len(chunk) >= previous:
            ends.append(start + len(chunk))
            continue
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        ends.append(max(previous, len(prefix)) if text.startswith(prefix) else previous)
    return ends


def step_token_spans(steps: list[Step], char_ends: list[int]) -> list[tuple[int, int]]:
    """Token span ``[start, end)`` of each step: the tokens whose text overlaps ``response[step.start:step.end]``.

    Spans do not overlap: a token shared by two steps (e.g. one holding a step's last character and the
    next step's first) belongs to the earlier one. ``char_ends`` comes from :func:`token_char_ends`.
    """
    spans: list[tuple[int, int]] = []
    previous_end = 0
    for step in steps:
        start = max(bisect.bisect_right(char_ends, step.start), previous_end)
        stop = min(bisect.bisect_left(char_ends, step.end) + 1, len(char_ends))
        stop = max(stop, start)
        spans.append((start, stop))
        previous_end = stop
    return spans
