"""The critique prompt of an LLM critic (the paper's four-case protocol) and the parser of its reply.

The critic sees the question, the ground-truth solution and the solver's answer re-written with one tag per
step ("Step 1: ...", "Answer: ..."), as :func:`sdlit.steps.split_steps` reads it, so that "Step k" in the
reply names the same step as ``Critique.steps``. It replies in a fixed layout::

    Verdicts:
    Step 1: correct
    Step 2: wrong - 12 * 4 is 48, not 46
    Answer: wrong
    Case: D
    Corrected solution:
    Step 1: ...
    Answer: 48

:class:`CritiqueParser` strips thinking traces, reads the verdicts and the case, and keeps the corrected
solution as the teacher context. A reply it cannot read raises :class:`CritiqueParseError`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Literal

from sdlit.critics.base import Critique, StepVerdict
from sdlit.steps import Step, has_step_tags, split_steps

__all__ = [
    "CritiqueParseError",
    "CritiqueParser",
    "CritiquePrompt",
    "DEFAULT_SYSTEM",
    "DEFAULT_TEMPLATE",
    "render_steps",
    "strip_thinking",
]

DEFAULT_SYSTEM = "You are a careful grader of step-by-step math solutions."

DEFAULT_TEMPLATE = """\
You are given a math problem, its ground-truth solution, and a student's answer whose steps are tagged \
"Step 1:", "Step 2:", ... and "Answer:".

Problem:
{question}

Ground-truth solution:
{reference}

Student's answer:
{response}

Check every step of the student's answer against the problem and the ground-truth solution. Then decide \
which case holds and write a corrected solution in the student's step format:
A. Every step is correct and the final answer is right: reproduce the student's steps unchanged.
B. The final answer is right but a step is missing: reproduce the student's steps and insert the missing \
step where it belongs.
C. The answer is unfinished (no final answer): reproduce the student's steps and finish the solution.
D. Some step is wrong: copy the correct steps before the earliest wrong step verbatim, write that step \
correctly, and continue from there to the right final answer. Do not repeat the wrong step.

Reply in exactly this format and nothing else:
Verdicts:
Step 1: correct
Step 2: wrong - <what is wrong in one sentence>
(one line per step of the student's answer)
Answer: correct, wrong or missing
Case: A, B, C or D
Corrected solution:
Step 1: ...
Step 2: ...
Answer: <final answer>"""

TEMPLATE_FIELDS = ("question", "reference", "response")

_CASES = {"a": "correct", "b": "missing_step", "c": "incomplete", "d": "wrong", "correct": "correct",
          "all correct": "correct", "missing step": "missing_step", "missing_step": "missing_step",
          "missing": "missing_step", "incomplete": "incomplete", "unfinished": "incomplete", "wrong": "wrong",
          "error": "wrong"}
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_DECOR = r"[ \t]*(?:[#>*_\-]+[ \t]*)*"
_VERDICTS_HEAD = re.compile(rf"^{_DECOR}verdicts?[ \t]*(?:\*\*)?[ \t]*:?[ \t]*(?:\*\*)?[ \t]*$", re.I | re.M)
_CORRECTED_HEAD = re.compile(rf"^{_DECOR}corrected[ \t]+solution[ \t]*(?:\*\*)?[ \t]*:?[ \t]*(?:\*\*)?[ \t]*",
                             re.I | re.M)
_CASE_LINE = re.compile(rf"^{_DECOR}case[ \t]*(?:\*\*)?[ \t]*[:\-][ \t]*(?:\*\*)?[ \t]*(.+)$", re.I | re.M)
_VERDICT_LINE = re.compile(
    rf"^{_DECOR}(?:step[ \t]*(\d+)|(?:final[ \t]+)?(answer))[ \t]*(?:\*\*)?[ \t]*[:.)\-–][ \t]*(?:\*\*)?[ \t]*"
    r"(correct|right|ok|wrong|incorrect|error|missing)\b[ \t]*(?:\*\*)?[ \t]*[-–:.,;(]?[ \t]*(.*?)[ \t)]*$",
    re.I | re.M,
)
_WRONG = {"wrong", "incorrect", "error"}


class CritiqueParseError(ValueError):
    """The critic's reply does not follow the critique layout (the rollout then falls back)."""


def strip_thinking(reply: str) -> str:
    """The reply without thinking traces: ``<think>...</think>`` blocks, a trace whose opening tag was in
    the prompt (text up to a lone ``</think>``) and an unterminated trace (``<think>`` to the end)."""
    text = _THINK_BLOCK.sub("", reply)
    close = text.lower().rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>"):]
    opening = text.lower().find("<think>")
    if opening >= 0:
        text = text[:opening]
    return text.strip()


def render_steps(steps: list[Step]) -> str:
    """Steps as the critic sees them: work steps numbered "Step 1: ..." from 1, the answer as "Answer: ..."."""
    lines, k = [], 0
    for step in steps:
        if step.kind == "answer":
            lines.append(f"Answer: {step.text}")
        else:
            k += 1
            lines.append(f"Step {k}: {step.text}")
    return "\n".join(lines) if lines else "(empty answer)"


@dataclass
class CritiquePrompt:
    """The critic's chat messages for one rollout.

    Args:
        template: The user message, a Python format string with the fields ``{question}``, ``{reference}``
            and ``{response}`` (literal braces doubled: ``{{``). Default: the four-case protocol above.
        system: The system message; empty for none.
        retag_response: Show the solver's answer re-tagged as split_steps reads it (``Step k:`` numbered
            from 1, ``Answer:``), so that the critic's step numbers name the same steps; else verbatim.
    """

    template: str = DEFAULT_TEMPLATE
    system: str = DEFAULT_SYSTEM
    retag_response: bool = True

    def __post_init__(self) -> None:
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        unknown = fields - set(TEMPLATE_FIELDS)
        if unknown:
            raise ValueError(f"critic prompt template: unknown field(s) {sorted(unknown)}; "
                             f"allowed: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
        if "response" not in fields:
            raise ValueError("critic prompt template must contain the field {response}")

    def messages(self, question: str, reference: str, response: str) -> list[dict[str, str]]:
        """Chat messages (system, then user) asking for a critique of ``response``."""
        shown = render_steps(split_steps(response)) if self.retag_response else response
        user = self.template.format(question=question.strip(), reference=reference.strip(), response=shown)
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}]


@dataclass
class CritiqueParser:
    """Turns a critic's reply into a :class:`Critique` aligned with the solver's steps.

    Args:
        strip_think: Remove thinking traces (``<think>...</think>``) before reading the reply.
        require_case: A reply without a ``Case:`` line is an error; else the case is inferred from the
            verdicts (a wrong step: wrong; no answer line: incomplete; otherwise correct).
        require_all_verdicts: A reply that leaves a step without a verdict is an error; else such a step
            counts as correct.
        context: Teacher context kept from the reply: ``corrected`` (a one-line verdict, then the corrected
            solution) or ``full`` (the whole reply after thinking is stripped).
    """

    strip_think: bool = True
    require_case: bool = False
    require_all_verdicts: bool = False
    context: Literal["corrected", "full"] = "corrected"

    def parse(self, reply: str, response: str) -> Critique:
        """The critique of ``response`` that ``reply`` states; raises CritiqueParseError when unreadable."""
        text = strip_thinking(reply) if self.strip_think else reply.strip()
        if not text:
            raise CritiqueParseError("the critic's reply is empty (after removing its thinking trace)")
        corrected_head = _CORRECTED_HEAD.search(text)
        if corrected_head is None:
            raise CritiqueParseError("the critic's reply has no 'Corrected solution:' section")
        head, corrected = text[: corrected_head.start()], text[corrected_head.end():].strip()
        if not corrected:
            raise CritiqueParseError("the critic's 'Corrected solution:' section is empty")
        steps = split_steps(response)
        verdicts = self._verdicts(head, steps)
        case = self._case(head, verdicts, steps)
        wrong = [v.index for v in verdicts if v.verdict == "wrong"]
        if case == "wrong" and not wrong:
            raise CritiqueParseError("the critic says a step is wrong (case D) but marks no step wrong")
        if wrong:
            case = "wrong"  # a step marked wrong outweighs a case line that says otherwise
        first_error = wrong[0] if wrong else None
        headline = _headline(case, first_error, verdicts, steps, corrected)
        context = text if self.context == "full" else f"{headline}\nCorrected solution:\n{corrected}"
        return Critique(case, first_error, verdicts, context, has_step_tags(response))

    def _verdicts(self, head: str, steps: list[Step]) -> list[StepVerdict]:
        """One verdict per solver step, from the reply's "Step k: correct|wrong - reason" lines."""
        section = head[_VERDICTS_HEAD.search(head).end():] if _VERDICTS_HEAD.search(head) else head
        by_number, answer = {}, None
        for m in _VERDICT_LINE.finditer(section):
            found = (m.group(3).lower(), m.group(4).strip())
            if m.group(2):
                answer = answer or found
            else:
                by_number.setdefault(int(m.group(1)), found)
        if not by_number and answer is None and steps:
            raise CritiqueParseError("the critic's reply has no step verdicts ('Step k: correct' / 'wrong')")
        verdicts, k = [], 0
        for step in steps:
            if step.kind == "answer":
                found = answer
            else:
                k += 1
                found = by_number.get(k)
            if found is None and self.require_all_verdicts:
                name = "the answer line" if step.kind == "answer" else f"step {k}"
                raise CritiqueParseError(f"the critic's reply gives no verdict on {name}")
            word, reason = found or ("correct", "")
            bad = word in _WRONG
            verdicts.append(StepVerdict(step.index, step.text, "wrong" if bad else "correct", reason if bad else ""))
        return verdicts

    def _case(self, head: str, verdicts: list[StepVerdict], steps: list[Step]) -> str:
        """The case the reply names (A-D or its name), else (unless required) inferred from the verdicts."""
        m = _CASE_LINE.search(head)
        if m is not None:
            value = re.sub(r"[*_`.]", "", m.group(1)).strip().lower()
            key = value if value in _CASES else re.split(r"[\s:(\-–,]+", value)[0]
            if key in _CASES:
                return _CASES[key]
            raise CritiqueParseError(f"the critic's case {m.group(1).strip()!r} is none of A, B, C, D")
        if self.require_case:
            raise CritiqueParseError("the critic's reply has no 'Case:' line")
        if any(v.verdict == "wrong" for v in verdicts):
            return "wrong"
        return "correct" if any(s.kind == "answer" for s in steps) else "incomplete"


def _headline(case: str, first_error: int | None, verdicts: list[StepVerdict], steps: list[Step],
              corrected: str = "") -> str:
    """One line that states the critic's finding. The wrong step itself is never quoted, and neither is a wrong
    value from it: the critic's reason loses any number of the wrong step that the corrected solution lacks
    (see :func:`_reason_without_wrong_values`), since a critique that quotes the error reinforces it."""
    if case == "correct":
        return "All steps are correct and the final answer is right."
    if case == "missing_step":
        return "The final answer is right, but a step is missing; it is added below."
    if case == "incomplete":
        return "The solution is unfinished; it is finished below."
    reason = _reason_without_wrong_values(verdicts[first_error].reason, steps[first_error].text, corrected)
    if steps[first_error].kind == "answer":
        return "The final answer is wrong" + (f": {reason}." if reason else ".")
    number = sum(1 for s in steps[: first_error + 1] if s.kind == "step")
    return f"Step {number} is wrong" + (f": {reason}." if reason else ".")


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:[.,]\d+)*")
_NOT_CLAUSE = re.compile(r"[,;]?\s*(?:and\s+|but\s+)?not\s+(-?\d+(?:[.,]\d+)*)")


def _reason_without_wrong_values(reason: str, wrong_step: str, corrected: str) -> str:
    """The critic's reason with the wrong step's wrong values taken out: a "not X" clause naming one is cut; a
    reason that still names one is dropped ('')."""
    wrong = set(_NUMBER.findall(wrong_step)) - set(_NUMBER.findall(corrected))
    if not reason or not wrong:
        return reason.rstrip(".") if reason else reason
    cleaned = _NOT_CLAUSE.sub(lambda m: "" if m.group(1) in wrong else m.group(0), reason).strip().rstrip(",;.")
    return "" if set(_NUMBER.findall(cleaned)) & wrong else cleaned
