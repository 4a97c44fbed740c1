"""Final-answer extraction and checking for math word problems (GSM8K style).

All answers are compared as numbers: "1,000", "$1000", "1000.0" and "1000%" all mean 1000.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# A number as written in text: 1,000 / 1000 / 3.5 / .5 (no sign; signs are handled by callers).
NUMBER = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_FULL_NUMBER = re.compile(
    rf"([-+]?)\s*\\?\$?\s*([-+]?)\s*({NUMBER}|\d[\d,]*(?:\.\d*)?)\s*(?:/\s*({NUMBER}))?\s*(?:\\?%)?"
)
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(
    r"answer\s*(?:\*\*)?\s*(?:is|was|:|=)\s*(?:\*\*)?\s*:?\s*([^\n]*)", re.IGNORECASE
)
_LEADING_NUMBER = re.compile(rf"^\s*[-+]?\s*\$?\s*[-+]?{NUMBER}(?:\s*/\s*{NUMBER})?")
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")


def to_fraction(text: str) -> Fraction | None:
    """Parse a number written in text ("1,000", "$3.50", "-2", "3/4", "50%") into an exact Fraction.

    Returns None when the text is not a single number. A trailing "%" is ignored (so "50%" is 50),
    matching how GSM8K writes percentages in final answers.
    """
    s = _FRAC.sub(r"\1/\2", text).replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    s = s.replace("**", "").replace("−", "-").strip().rstrip(".").strip()
    m = _FULL_NUMBER.fullmatch(s)
    if m is None:
        return None
    sign1, sign2, num, den = m.groups()
    if sign1 and sign2:
        return None
    value = Fraction(num.replace(",", "").rstrip(".") or "0")
    if den is not None:
        den_value = Fraction(den.replace(",", ""))
        if den_value == 0:
            return None
        value /= den_value
    return -value if "-" in (sign1 + sign2) else value


def format_number(value: Fraction | float | int) -> str:
    """Canonical string of a number: integers without decimals, others with at most 9 decimals."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.9f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def normalize_number(text: str) -> str | None:
    """Canonical string of a number written in text, or None if the text is not a number.

    "1,000", "1000.0", "$1000", " 1000. " and "1000%" all give "1000"; "0.50" gives "0.5";
    "3/4" gives "0.75"; "-3" gives "-3".
    """
    value = to_fraction(text)
    return None if value is None else format_number(value)


def find_numbers(text: str) -> list[str]:
    """All numbers in a text, in order, as written (signs kept only where they cannot be a minus)."""
    return [m.group(0) for m in re.finditer(rf"(?<![\w.,])-?{NUMBER}|{NUMBER}", text)]


def boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} in the text, with nested braces matched."""
    contents = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            contents.append(text[m.end() : i - 1])
    return contents


def _marked_value(marked: str) -> str | None:
    """Value of a marked answer ("#### X", "\\boxed{X}", "answer is X"): its number, else its text."""
    marked = marked.strip()
    if not marked:
        return None
    value = normalize_number(marked)
    if value is not None:
        return value
    tail = marked.replace("**", "").split("=")[-1]
    m = _LEADING_NUMBER.match(tail)
    if m is not None and (value := normalize_number(m.group(0))) is not None:
        return value
    return marked.replace("**", "").strip().rstrip(".").strip() or None


def extract_answer(text: str) -> str | None:
    """The final answer of a response, normalized (see normalize_number), or None if there is none.

    Priority: the last "#### X"; the last \\boxed{X}; the last "answer is X" / "Answer: X" /
    "final answer: X" (case-insensitive, "$", commas, "**" and trailing units allowed); else the last
    number in the text. A marked answer that is not a number is returned as its stripped text.
    """
    if not text:
        return None
    for marked in (
        [m.group(1) for m in _HASHES.finditer(text)],
        boxed_contents(text),
        [m.group(1) for m in _ANSWER_IS.finditer(text)],
    ):
        if marked and (value := _marked_value(marked[-1])) is not None:
            return value
    numbers = find_numbers(text)
    return normalize_number(numbers[-1]) if numbers else None


def gold_value(gold: str) -> str | None:
    """Normalize a gold answer given as "1,000", "#### 1,000" or a full GSM8K solution."""
    value = normalize_number(gold)
    if value is not None:
        return value
    if "####" in gold or "\\boxed" in gold:  # a worked solution: take its marked final answer
        return extract_answer(gold)
    return gold.strip() or None  # a non-numeric gold answer is compared as text


def same_number(a: str | None, b: str | None) -> bool:
    """True when two answer strings are the same number (abs tol 1e-6, rel tol 1e-9), or equal text."""
    if a is None or b is None:
        return False
    fa, fb = to_fraction(a), to_fraction(b)
    if fa is None or fb is None:
        return a.strip().lower() == b.strip().lower()
    return math.isclose(float(fa), float(fb), rel_tol=1e-9, abs_tol=1e-6)


def is_correct(response: str, gold: str) -> bool:
    """True when the final answer extracted from `response` equals `gold` numerically."""
    return same_number(extract_answer(response), gold_value(gold))
