"""Arithmetic claims in free text: find every "a op b (op c ...) = r" and evaluate it exactly.

The parser reads the run of numbers, operators and parentheses before each "=", evaluates it with fractions and
the usual precedence (* and / before + and -), and records the stated result and every intermediate value of a
chain. Numbers written in words in a question ("three", "half", "a dozen") are read too. The rule-based critic
(:mod:`sdlit.critics.arithmetic`) judges a solver's steps with these claims.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from sdlit.tasks.answers import NUMBER, to_fraction
from sdlit.tasks.solutions import clean_solution

__all__ = ["Claim", "contains_value", "evaluate_claims", "given_numbers", "numbers_in"]

_MUL, _DIV = set("*xX×·"), set("/÷")
_TOKEN = re.compile(rf"\s*(?:(\$?{NUMBER}%?)|([-–+*/xX×÷·])|([()]))")
_LHS = re.compile(r"[\d\s$.,%+\-–*/xX×÷·()]*$")
# The stated result; a result that goes on as an expression ("= 14 / 2 = 7") or a mixed number
# ("= 3 1/2") is no claim of its own.
_RHS = re.compile(rf"\s*\$?\s*(-?{NUMBER})(?!\.?\d|,\d|[A-Za-z])(%?)(?![ \t]*(?:[-–+*/xX×÷·][ \t]*[\d.$(]|\d))")
# One or two unit words between a number and an operator or "=": "12 miles / 4 mph = 3 hours".
_OPERATOR_BEFORE_WORDS = re.compile(r"[-–+*/×÷·]\s*(?:[A-Za-z'][\w']*\s*){1,3}$")
_UNITS = re.compile(rf"({NUMBER}%?)[ \t]+(?:(?![xX]\b)[A-Za-z][\w']*[ \t]*){{1,2}}(?=[-–+*/×÷·=]|[xX][ \t])")
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
          "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30, "forty": 40,
          "fifty": 50, "hundred": 100, "thousand": 1000, "dozen": 12, "half": 2, "twice": 2, "double": 2,
          "triple": 3, "quarter": 4, "third": 3}

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
    text = _UNITS.sub(r"\1 ", clean_solution(text))
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


def numbers_in(text: str) -> list[Fraction]:
    """Every number in a text as a Fraction (a percentage also as its fraction)."""
    values = []
    for m in re.finditer(rf"(?<![\w.,]){NUMBER}(%?)|(?<=[^\W\d_]){NUMBER}", text):
        values.append(to_fraction(m.group(0).rstrip("%")))
        if m.group(1):
            values.append(values[-1] / 100)
    return values


def contains_value(values: Sequence[Fraction], x: Fraction) -> bool:
    """True when x is (numerically close to) one of the values."""
    return any(abs(v - x) <= Fraction(1, 10**6) + abs(x) * Fraction(1, 10**9) for v in values)


def given_numbers(question: str) -> list[Fraction]:
    """Numbers given in the question, digits or words ("three", "half", "a dozen")."""
    words = [Fraction(v) for w, v in _WORDS.items() if re.search(rf"\b{w}\b", question, re.IGNORECASE)]
    return numbers_in(question) + words + [Fraction(1, 2)] * ("half" in question.lower())
