"""Competition-style math with ``\\boxed{}`` final answers (MATH, OpenMathReasoning and the like).

Rows come from JSONL/Parquet files or a ``datasets`` dataset, with configurable field names. The gold
answer is a field of its own (OpenMathReasoning's ``expected_answer``) or the last ``\\boxed{}`` of the
reference solution (MATH). Answers are compared as numbers when both sides are numbers (``\\frac{1}{2}``
equals ``0.5``), else as LaTeX with spacing and sizing commands removed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from sdlit.tasks import answers
from sdlit.tasks.base import DataError, Problem
from sdlit.tasks.gsm8k import GSM8K

_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\^\{?\\circ\}?|\\%|%|\$|\s+")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_math_answer(text: str | None) -> str | None:
    """A canonical form of a final answer: its number when it is one, else LaTeX without spacing noise."""
    if text is None:
        return None
    cleaned = _TEXT.sub(r"\1", text.strip()).replace("dfrac", "frac").replace("tfrac", "frac")
    cleaned = _DROP.sub("", cleaned).rstrip(".")
    number = answers.normalize_number(cleaned)
    return number if number is not None else (cleaned or None)


def extract_answer(text: str) -> str | None:
    """The final answer of a response (last ``\\boxed{}`` first, then the usual markers), normalized."""
    boxed = answers.boxed_contents(text or "")
    return normalize_math_answer(boxed[-1] if boxed else answers.extract_answer(text))


def is_correct(response: str, gold: str) -> bool:
    """True when the response's final answer equals ``gold`` (numerically, or as normalized LaTeX)."""
    predicted, expected = extract_answer(response), normalize_math_answer(gold)
    if predicted is None or expected is None:
        return False
    return answers.same_number(predicted, expected)


class Math(GSM8K):
    """Math problems whose final answers are ``\\boxed{}`` expressions.

    Args:
        train_path: JSONL/Parquet file of training problems (or give ``dataset``).
        eval_path: JSONL/Parquet file of held-out problems (or give ``dataset``).
        dataset: A name ``datasets.load_dataset`` accepts, used for a split whose path is not given.
        dataset_config: The dataset configuration name.
        train_split: Dataset split of the training problems.
        eval_split: Dataset split of the held-out problems.
        train_size: Keep only the first this many training problems (None: all).
        eval_size: Keep only the first this many held-out problems (None: all).
        on_bad_row: ``error`` stops at the first bad row naming file, row and field; ``skip`` skips and counts.
        question_field: Field holding the problem statement (MATH: ``problem``).
        solution_field: Field holding the worked reference solution (OpenMathReasoning: ``generated_solution``).
        answer_field: Field holding the final answer (OpenMathReasoning: ``expected_answer``); default: the
            last ``\\boxed{}`` of the solution.
    """

    name = "math"

    def __init__(
        self,
        train_path: str | None = None,
        eval_path: str | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        eval_split: str = "test",
        train_size: int | None = None,
        eval_size: int | None = None,
        on_bad_row: Literal["error", "skip"] = "error",
        question_field: str = "problem",
        solution_field: str = "solution",
        answer_field: str | None = None,
    ) -> None:
        super().__init__(train_path, eval_path, dataset, dataset_config, train_split, eval_split,
                         train_size, eval_size, on_bad_row)
        self.question_field = question_field
        self.solution_field = solution_field
        self.answer_field = answer_field

    def default_path(self, role: str) -> Path:
        """No math data ships with sdlit: a path or a dataset is required."""
        raise DataError(f"task math: give data.task.{role}_path (JSONL/Parquet) or data.task.dataset")

    def parse_row(self, row: object, source: str, number: int, id: str) -> Problem:
        """One row as a Problem; a DataError names source, row and field."""
        where = f"{source}: row {number}"
        fields = [self.question_field, self.solution_field] + ([self.answer_field] if self.answer_field else [])
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields {', '.join(map(repr, fields))}")
        for field in fields:
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field '{field}' is missing or empty")
        solution = row[self.solution_field].strip()
        gold = self._gold(row, solution)
        if gold is None:
            field = self.answer_field or self.solution_field
            raise DataError(f"{where}: field '{field}': no final answer (expected a \\boxed{{...}})")
        return Problem(question=row[self.question_field].strip(), solution=solution, answer=gold, id=id)

    def _gold(self, row: dict, solution: str) -> str | None:
        if self.answer_field:
            return normalize_math_answer(row[self.answer_field])
        boxed = answers.boxed_contents(solution)
        return normalize_math_answer(boxed[-1]) if boxed else None

    def extract_answer(self, text: str) -> str | None:
        """The normalized final answer of a response (last ``\\boxed{}`` first)."""
        return extract_answer(text)

    def is_correct(self, response: str, gold: str) -> bool:
        """True when the response's final answer equals the gold answer."""
        return is_correct(response, gold)
