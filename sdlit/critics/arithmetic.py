"""A rule-based step critic for GSM8K-style problems, following the paper's four-case protocol.

It checks every arithmetic claim "a op b (op c ...) = r" in each solver step, compares the quantities
the solver computes with those of the reference solution (its <<a op b=c>> annotations), and writes a
teacher context: (A) correct: the solver's steps unchanged; (B) missing step: inserted; (C) unfinished:
finished from the reference; (D) wrong: the correct prefix copied verbatim, then the reference steps
from the first quantity not yet computed, then the gold answer. Neither the wrong step nor the wrong value
it states is quoted, only the corrected value (quoting the error reinforces it); the step verdicts name it.

Stopped short: when every work step is right, the solution is unfinished and the answer is the last work
step's result (a partial result answered as final), that last work step is the first error. The case is
"wrong" (D: a wrong answer was given; C is a response without an answer line); the step is copied with
the correct prefix (its work is right, stopping there is the error) and the solution continued after it.

Expressions are evaluated exactly (fractions) with the usual precedence (* and / before + and -) and
parentheses; every intermediate result of a chain counts as a computed quantity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from sdlit.critics.base import Critique, StepVerdict
from sdlit.critics.claims import contains_value, evaluate_claims, given_numbers, numbers_in
from sdlit.steps import Step, has_step_tags, split_steps
from sdlit.tasks.answers import extract_answer, format_number, gold_value, same_number, to_fraction
from sdlit.tasks.solutions import annotations, clean_solution, solution_lines

__all__ = ["ArithmeticStepCritic", "given_numbers", "parse_reference"]

# Numbers a step may state without them appearing anywhere: units and common conversion factors.
COMMON_CONSTANTS = [Fraction(n) for n in (0, 1, 2, 7, 10, 12, 24, 52, 60, 100, 365, 1000)]
# Findings the teacher context states; they never name the solver's wrong value.
_UNNEEDED = "it computes a quantity this problem does not need"
_UNSUPPORTED = "it uses a number that does not follow from the problem or the earlier steps"
_STOPPED = "the solution stops here, before the final result; it is continued below"


@dataclass
class _Reference:
    """The parsed reference solution."""

    steps: list[tuple[str, list[Fraction]]]  # (line with annotations removed, its result quantities)
    quantities: list[Fraction]  # every quantity the problem needs (results, chain intermediates, gold)
    required: list[Fraction]  # results a complete solution computes (not the gold, not given in the question)
    numbers: list[Fraction]  # every number in the reference text
    gold: str | None


def _line_results(line: str, display: str, annotated: bool, given: list[Fraction]) -> tuple[list, list]:
    """(results, all quantities incl. chain intermediates) of one reference line."""
    results, quantities = [], []
    claims = [c for inner in annotations(line) for c in evaluate_claims(inner.replace("=", " = ", 1))]
    claims += [c for c in evaluate_claims(display) if c.ok]
    for claim in claims:
        if not contains_value(results, claim.stated):
            results.append(claim.stated)
        quantities += [claim.stated, *(claim.intermediates if claim.ok else ())]
    if not annotated and not claims:
        results = [n for n in numbers_in(display) if not contains_value(given, n)]
    return results, quantities


def parse_reference(reference: str, given: list[Fraction]) -> _Reference:
    """Reference steps and quantities from a GSM8K solution.

    A line's results are its annotation results plus the results of its correct plain-text claims
    ("6/4=1.5"); in a reference without annotations, a line without claims yields its new numbers.
    """
    gold = gold_value(reference)
    gold_number = to_fraction(gold) if gold is not None else None
    lines = solution_lines(reference)
    annotated = bool(annotations(reference))
    numbers = numbers_in(clean_solution(reference))
    steps, quantities = [], list(numbers) + ([gold_number] if gold_number is not None else [])
    for line in lines:
        display = re.sub(r"[ \t]+", " ", clean_solution(line)).strip()
        results, found = _line_results(line, display, annotated, given)
        steps.append((display, results))
        quantities += found
    required, gold_numbers = [], [gold_number] if gold_number is not None else []
    for r in (r for _, results in steps for r in results):
        if not contains_value(given, r) and not contains_value(required, r) and not contains_value(gold_numbers, r):
            required.append(r)
    return _Reference(steps, quantities, required, numbers, gold)


class ArithmeticStepCritic:
    """Rule-based step critic for GSM8K-style problems (frozen, deterministic, no model).

    A work step is wrong when one of its arithmetic claims is wrong, or when a claim's result is neither
    a quantity of the reference solution nor a number given in the question. A step without claims is
    wrong only when it states a number found nowhere (question, reference, earlier steps, common
    constants). The answer line is wrong when it differs from the gold answer. When it is the first wrong
    step but the solver stopped short (see the module docstring), the last work step is the first error.
    """

    def critique_batch(self, items: Sequence[tuple[str, str, str]]) -> list[Critique]:
        """Critique many (question, reference, response) triples, in order."""
        return [self.critique(q, ref, resp) for q, ref, resp in items]

    def critique(self, question: str, reference: str, response: str) -> Critique:
        """Critique one response against the reference solution (see the module docstring)."""
        given = given_numbers(question)
        ref = parse_reference(reference, given)
        steps = split_steps(response)
        verdicts, fixes, news, computed = [], [], [], []
        for step in steps:
            reason, fix, new = self._judge(step, ref, given, computed)
            verdicts.append(StepVerdict(step.index, step.text, "wrong" if reason else "correct", reason))
            fixes.append(fix)
            news.append(new)
            computed += new
        wrong = [v.index for v in verdicts if v.verdict == "wrong"]
        stop = self._stopped_short(steps, wrong, news, ref)
        if stop is not None:
            verdicts[stop], fixes[stop] = StepVerdict(stop, steps[stop].text, "wrong", _STOPPED), _STOPPED
            wrong.insert(0, stop)
        missing = [q for q in ref.required if not contains_value(computed, q)]
        if wrong:
            case, text = "wrong", self._wrong_text(steps, wrong[0], fixes[wrong[0]], ref, news, stop is not None)
        elif not any(s.kind == "answer" for s in steps):
            case, text = "incomplete", self._incomplete_text(steps, ref, computed)
        elif missing:
            case, text = "missing_step", self._missing_text(steps, [numbers_in(s.text) for s in steps], missing, ref)
        else:
            case, text = "correct", "All steps are correct and the final answer is right.\n" + _render(
                [(s.kind, s.text) for s in steps])
        tagged = has_step_tags(response)
        if not tagged:
            text = "The answer had no step tags, so each line was read as one step.\n" + text
        return Critique(case, wrong[0] if wrong else None, verdicts, text, tagged)

    def _judge(self, step: Step, ref: _Reference, given: list[Fraction], computed: list[Fraction]):
        """(reason, fix, quantities computed): the reason ("" if correct) goes into the step's verdict and may
        name the wrong value; the fix, the same finding for the teacher context, states only what is right."""
        if step.kind == "answer":
            value = extract_answer(step.text)
            if ref.gold is None or same_number(value, ref.gold):
                return "", "", []
            if value is None:
                return "the answer line gives no number", "the answer line gives no number", []
            return f"the final answer is {ref.gold}, not {value}", f"the answer is {ref.gold}", []
        claims = evaluate_claims(step.text)
        known = given + ref.quantities + ref.numbers + computed + COMMON_CONSTANTS
        for claim in claims:
            if not claim.ok:
                actual = "undefined (division by zero)" if claim.value is None else format_number(claim.value)
                operands_known = all(contains_value(known, n) for n in numbers_in(claim.expr))
                return (f"{claim.expr} is {actual}, not {claim.stated_text}",
                        f"{claim.expr} is {actual}" if operands_known else _UNSUPPORTED, [])
        for claim in claims:
            if not contains_value(ref.quantities, claim.stated) and not contains_value(given, claim.stated):
                return f"{format_number(claim.stated)} is not a quantity this problem needs", _UNNEEDED, []
        if claims:
            return "", "", [q for c in claims for q in (*c.intermediates[:-1], c.stated)]
        for n in numbers_in(clean_solution(step.text)):
            if not contains_value(known, n):
                return f"{format_number(n)} does not follow from the problem or the earlier steps", _UNSUPPORTED, []
        return "", "", numbers_in(step.text)

    def _stopped_short(self, steps: list[Step], wrong: list[int], news: list[list], ref: _Reference) -> int | None:
        """The last work step, when the solver answered its result as final before finishing; else None.

        That is when the answer line is the first wrong step, the work step just before it states the
        answered value as its result (or restates it), and the solution is unfinished: the reference's last
        step with results is still pending, or no step computed the gold answer.
        """
        at = wrong[0] if wrong else 0
        if at == 0 or steps[at].kind != "answer" or steps[at - 1].kind != "step":
            return None
        answered, claims = to_fraction(extract_answer(steps[at].text) or ""), evaluate_claims(steps[at - 1].text)
        computed, gold = [q for new in news[:at] for q in new], to_fraction(ref.gold or "")
        pending = [p for p, (_, r) in zip(self._pending(ref, computed), ref.steps, strict=True) if r]
        unfinished = (pending and pending[-1]) or (gold is not None and not contains_value(computed, gold))
        results = [c.stated for c in claims] if claims else news[at - 1]
        return at - 1 if answered is not None and contains_value(results, answered) and unfinished else None

    def _pending(self, ref: _Reference, computed: list[Fraction]) -> list[bool]:
        """Per reference step, whether some result of it is not computed yet.

        Each computed quantity accounts for one reference result only, so a value that occurs twice in
        the reference (17-5=12, later 23-11=12) must be computed twice.
        """
        pool, pending = list(computed), []
        for _, results in ref.steps:
            done = bool(results)
            for r in results:
                hit = next((i for i, q in enumerate(pool) if contains_value([q], r)), None)
                done = done and hit is not None
                if hit is not None:
                    pool.pop(hit)
            pending.append(not done)
        return pending

    def _remaining(self, ref: _Reference, computed: list[Fraction]) -> list[tuple[str, str]]:
        """Reference steps from the first one whose results are not yet computed, skipping computed ones."""
        pending = self._pending(ref, computed)
        first = next((i for i, (_, results) in enumerate(ref.steps) if results and pending[i]), len(ref.steps))
        return [("step", line) for i, (line, _) in enumerate(ref.steps[first:], start=first) if pending[i]]

    def _incomplete_text(self, steps: list[Step], ref: _Reference, computed: list[Fraction]) -> str:
        """Case C: the solver's steps, then the remaining reference steps and the gold answer."""
        lines = [(s.kind, s.text) for s in steps] + self._remaining(ref, computed) + _gold_line(ref)
        return "The solution stops before the final answer; it is finished below.\n" + _render(lines)

    def _missing_text(self, steps: list[Step], uses: list, missing: list[Fraction], ref: _Reference) -> str:
        """Case B: the solver's steps with each missing reference step inserted where it is first used."""
        inserts: dict[int, list[tuple[str, str]]] = {}
        answer_at = next((s.index for s in steps if s.kind == "answer"), len(steps))
        for line, results in ref.steps:
            lacking = [q for q in missing if contains_value(results, q)]
            if not lacking:
                continue
            at = next((i for i, used in enumerate(uses) if any(contains_value(used, q) for q in lacking)), answer_at)
            inserts.setdefault(min(at, answer_at), []).append(("step", line))
        lines = []
        for step in steps:
            lines += inserts.pop(step.index, []) + [(step.kind, step.text)]
        lines += [line for group in inserts.values() for line in group]
        return "The final answer is right, but a step is missing; it is added below.\n" + _render(lines)

    def _wrong_text(self, steps: list[Step], first: int, fix: str, ref: _Reference, news: list[list],
                    stopped: bool) -> str:
        """Case D: the finding ``fix`` (no wrong value in it), the correct prefix verbatim, the reference from
        there, the gold answer. A step where the solver stopped short is part of the prefix (``stopped``)."""
        head = (f"The final answer is wrong: {fix}." if steps[first].kind == "answer"
                else f"Step {first + 1} is wrong: {fix}.")
        prefix = [s for s in steps[: first + stopped] if s.kind == "step"]
        computed = [q for new in news[: first + stopped] for q in new]
        lines = [(s.kind, s.text) for s in prefix] + self._remaining(ref, computed) + _gold_line(ref)
        return f"{head}\nCorrected solution:\n" + _render(lines)


def _gold_line(ref: _Reference) -> list[tuple[str, str]]:
    """The gold answer as a final answer line, if the reference has one."""
    return [("answer", ref.gold)] if ref.gold is not None else []


def _render(lines: list[tuple[str, str]]) -> str:
    """Write (kind, text) lines as "Step k: text" (numbered from 1) and "Answer: text"."""
    out, k = [], 0
    for kind, text in lines:
        k += kind != "answer"
        out.append(f"Answer: {text}" if kind == "answer" else f"Step {k}: {text}")
    return "\n".join(out)
