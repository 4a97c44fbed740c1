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
from sdlit.steps import Step, has_step_tags, split_steps
from sdlit.tasks.answers import NUMBER, extract_answer, format_number, gold_value, same_number, to_fraction

__all__ = ["ArithmeticStepCritic", "evaluate_claims", "Claim"]

_MUL, _DIV = set("*xX×·"), set("/÷")
_TOKEN = re.compile(rf"\s*(?:(\$?{NUMBER}%?)|([-–+*/xX×÷·])|([()]))")
_LHS = re.compile(r"[\d\s$.,%+\-–*/xX×÷·()]*$")
# The stated result; a result that goes on as an expression ("= 14 / 2 = 7") or a mixed number
# ("= 3 1/2") is no claim of its own.
_RHS = re.compile(rf"\s*\$?\s*(-?{NUMBER})(?!\.?\d|,\d|[A-Za-z])(%?)(?![ \t]*(?:[-–+*/xX×÷·][ \t]*[\d.$(]|\d))")
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
# One or two unit words between a number and an operator or "=": "12 miles / 4 mph = 3 hours".
_OPERATOR_BEFORE_WORDS = re.compile(r"[-–+*/×÷·]\s*(?:[A-Za-z'][\w']*\s*){1,3}$")
_UNITS = re.compile(rf"({NUMBER}%?)[ \t]+(?:(?![xX]\b)[A-Za-z][\w']*[ \t]*){{1,2}}(?=[-–+*/×÷·=]|[xX][ \t])")
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
          "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30, "forty": 40,
          "fifty": 50, "hundred": 100, "thousand": 1000, "dozen": 12, "half": 2, "twice": 2, "double": 2,
          "triple": 3, "quarter": 4, "third": 3}
# Numbers a step may state without them appearing anywhere: units and common conversion factors.
COMMON_CONSTANTS = [Fraction(n) for n in (0, 1, 2, 7, 10, 12, 24, 52, 60, 100, 365, 1000)]
# Findings the teacher context states; they never name the solver's wrong value.
_UNNEEDED = "it computes a quantity this problem does not need"
_UNSUPPORTED = "it uses a number that does not follow from the problem or the earlier steps"
_STOPPED = "the solution stops here, before the final result; it is continued below"


@dataclass(frozen=True)
class Claim:
    """One arithmetic claim "expr = stated" found in a step."""

    expr: str
    value: Fraction | None  # None when the expression divides by zero
    stated: Fraction
    stated_text: str
    intermediates: tuple[Fraction, ...]
    percent: bool = False  # the result was written "r%": r and r/100 both count

    @property
    def ok(self) -> bool:
        """True when the stated result equals the value (rounding allowed to the stated decimals)."""
        if self.value is None:
            return False
        decimals = len(self.stated_text.split(".")[1]) if "." in self.stated_text else 0
        tol = Fraction(1, 2 * 10**decimals) if decimals else Fraction(0)
        stated = [self.stated, self.stated / 100] if self.percent else [self.stated]
        return any(abs(self.value - s) <= tol + Fraction(1, 10**9) * max(1, abs(s)) for s in stated)


def _number(text: str) -> Fraction:
    """A number token ("$1,000", "150%") as a Fraction."""
    value = to_fraction(text.replace("%", ""))
    return value / 100 if text.endswith("%") else value


def _tokens(run: str) -> list[str]:
    """Tokenize an expression run (after its last non-token character); "27(1/3)" gets its "*"."""
    tokens, pos = [], 0
    while pos < len(run):
        if run[pos].isspace():
            pos += 1
            continue
        m = _TOKEN.match(run, pos)
        if m is None:
            tokens, pos = [], pos + 1
            continue
        token = m.group(0).strip()
        after_value = bool(tokens) and (tokens[-1] == ")" or tokens[-1][-1].isdigit() or tokens[-1][-1] == "%")
        if after_value and (token == "(" or (tokens[-1] == ")" and token[-1].isdigit())):
            tokens.append("*")
        tokens.append(token)
        pos = m.end()
    return tokens


def _parse(tokens: list[str]) -> tuple[Fraction | None, list[Fraction], int]:
    """Evaluate tokens with precedence; returns (value or None on division by zero, intermediates, ops)."""
    pos, steps, ops = 0, [], 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def factor():
        nonlocal pos
        tok = peek()
        if tok == "-" and (pos == 0 or tokens[pos - 1] == "("):
            pos += 1
            value = factor()
            return None if value is None else -value
        if tok == "(":
            pos += 1
            value = expr()
            if peek() != ")":
                raise ValueError("unbalanced")
            pos += 1
            return value
        if tok is None or not re.match(r"\$?[\d.]", tok):
            raise ValueError("number expected")
        pos += 1
        return _number(tok)

    def binary(sub, symbols):
        nonlocal pos, ops
        value = sub()
        while peek() is not None and peek() in symbols:
            op = tokens[pos]
            pos += 1
            right = sub()
            ops += 1
            if value is None or right is None or (op in _DIV and right == 0):
                value = None
                continue
            value = value + right if op == "+" else value - right if op in "-–" else (
                value * right if op in _MUL else value / right)
            steps.append(value)
        return value

    def term():
        return binary(factor, _MUL | _DIV)

    def expr():
        return binary(term, {"+", "-", "–"})

    value = expr()
    if pos != len(tokens):
        raise ValueError("trailing tokens")
    return value, steps, ops


def _left_side(before: str) -> str | None:
    """The expression run that ends at an "=", or None when it starts inside words ("60g * 4/5", "2L + 8")."""
    start = _LHS.search(before).start()
    while start < len(before) and before[start] in "xX" and start > 0 and before[start - 1].isalpha():
        start += 1  # the "x" ends a word ("box 3+4"), it is no operator
    run = before[start:]
    if start > 0 and before[start - 1].isalpha() and run.lstrip()[:1] in tuple("+-–*/xX×÷·"):
        return None
    if _OPERATOR_BEFORE_WORDS.search(before[:start]):
        return None  # "25 classmates + his 1 + 1 = 27": the expression goes on to the left
    return run


def _drop_unmatched_open(tokens: list[str]) -> list[str]:
    """Leading "(" that the left side never closes belong to the prose ("... as before (15 / 2 = 4)")."""
    while tokens and tokens[0] == "(" and tokens.count("(") > tokens.count(")"):
        tokens = tokens[1:]
    return tokens


def evaluate_claims(text: str) -> list[Claim]:
    """All arithmetic claims "a op b (op c ...) = r" in a text (annotations <<...>> are ignored).

    The left-hand side is the run of numbers, operators and parentheses that ends at an "="; it must
    parse as a whole, else the "=" is no claim (so algebra like "3x + 4 = 28" is left alone). Unit
    words after a number are skipped ("12 miles / 4 mph = 3").
    """
    text = _UNITS.sub(r"\1 ", _ANNOTATION.sub("", text))
    claims = []
    for eq in re.finditer(r"(?<![=<>!])=(?!=)", text):
        rhs = _RHS.match(text, eq.end())
        lhs = _left_side(text[: eq.start()])
        if rhs is None or lhs is None:
            continue
        stated = to_fraction(rhs.group(1))
        tokens = _drop_unmatched_open(_tokens(lhs))
        try:
            value, steps, ops = _parse(tokens)
        except ValueError:
            continue  # not a plain expression (words, variables, "3 1/2"): no claim
        if ops:
            claims.append(Claim(" ".join(tokens), value, stated, rhs.group(1), tuple(steps), bool(rhs.group(2))))
    return claims


def _numbers(text: str) -> list[Fraction]:
    """Every number in a text as a Fraction (a percentage also as its fraction)."""
    values = []
    for m in re.finditer(rf"(?<![\w.,]){NUMBER}(%?)|(?<=[^\W\d_]){NUMBER}", text):
        values.append(to_fraction(m.group(0).rstrip("%")))
        if m.group(1):
            values.append(values[-1] / 100)
    return values


def _has(values: Sequence[Fraction], x: Fraction) -> bool:
    """True when x is (numerically close to) one of the values."""
    return any(abs(v - x) <= Fraction(1, 10**6) + abs(x) * Fraction(1, 10**9) for v in values)


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
    claims = [c for inner in _ANNOTATION.findall(line) for c in evaluate_claims(inner.replace("=", " = ", 1))]
    claims += [c for c in evaluate_claims(display) if c.ok]
    for claim in claims:
        if not _has(results, claim.stated):
            results.append(claim.stated)
        quantities += [claim.stated, *(claim.intermediates if claim.ok else ())]
    if not annotated and not claims:
        results = [n for n in _numbers(display) if not _has(given, n)]
    return results, quantities


def parse_reference(reference: str, given: list[Fraction]) -> _Reference:
    """Reference steps and quantities from a GSM8K solution.

    A line's results are its annotation results plus the results of its correct plain-text claims
    ("6/4=1.5"); in a reference without annotations, a line without claims yields its new numbers.
    """
    gold = gold_value(reference)
    gold_number = to_fraction(gold) if gold is not None else None
    lines = [ln.strip() for ln in reference.splitlines() if ln.strip() and not ln.strip().startswith("####")]
    annotated = bool(_ANNOTATION.search(reference))
    numbers = _numbers(_ANNOTATION.sub("", reference))
    steps, quantities = [], list(numbers) + ([gold_number] if gold_number is not None else [])
    for line in lines:
        display = re.sub(r"[ \t]+", " ", _ANNOTATION.sub("", line)).strip()
        results, found = _line_results(line, display, annotated, given)
        steps.append((display, results))
        quantities += found
    required, gold_numbers = [], [gold_number] if gold_number is not None else []
    for r in (r for _, results in steps for r in results):
        if not _has(given, r) and not _has(required, r) and not _has(gold_numbers, r):
            required.append(r)
    return _Reference(steps, quantities, required, numbers, gold)


def given_numbers(question: str) -> list[Fraction]:
    """Numbers given in the question, digits or words ("three", "half", "a dozen")."""
    words = [Fraction(v) for w, v in _WORDS.items() if re.search(rf"\b{w}\b", question, re.IGNORECASE)]
    return _numbers(question) + words + [Fraction(1, 2)] * ("half" in question.lower())


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
        missing = [q for q in ref.required if not _has(computed, q)]
        if wrong:
            case, text = "wrong", self._wrong_text(steps, wrong[0], fixes[wrong[0]], ref, news, stop is not None)
        elif not any(s.kind == "answer" for s in steps):
            case, text = "incomplete", self._incomplete_text(steps, ref, computed)
        elif missing:
            case, text = "missing_step", self._missing_text(steps, [_numbers(s.text) for s in steps], missing, ref)
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
                operands_known = all(_has(known, n) for n in _numbers(claim.expr))
                return (f"{claim.expr} is {actual}, not {claim.stated_text}",
                        f"{claim.expr} is {actual}" if operands_known else _UNSUPPORTED, [])
        for claim in claims:
            if not _has(ref.quantities, claim.stated) and not _has(given, claim.stated):
                return f"{format_number(claim.stated)} is not a quantity this problem needs", _UNNEEDED, []
        if claims:
            return "", "", [q for c in claims for q in (*c.intermediates[:-1], c.stated)]
        for n in _numbers(_ANNOTATION.sub("", step.text)):
            if not _has(known, n):
                return f"{format_number(n)} does not follow from the problem or the earlier steps", _UNSUPPORTED, []
        return "", "", _numbers(step.text)

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
        unfinished = (pending and pending[-1]) or (gold is not None and not _has(computed, gold))
        results = [c.stated for c in claims] if claims else news[at - 1]
        return at - 1 if answered is not None and _has(results, answered) and unfinished else None

    def _pending(self, ref: _Reference, computed: list[Fraction]) -> list[bool]:
        """Per reference step, whether some result of it is not computed yet.

        Each computed quantity accounts for one reference result only, so a value that occurs twice in
        the reference (17-5=12, later 23-11=12) must be computed twice.
        """
        pool, pending = list(computed), []
        for _, results in ref.steps:
            done = bool(results)
            for r in results:
                hit = next((i for i, q in enumerate(pool) if _has([q], r)), None)
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
            lacking = [q for q in missing if _has(results, q)]
            if not lacking:
                continue
            at = next((i for i, used in enumerate(uses) if any(_has(used, q) for q in lacking)), answer_at)
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
