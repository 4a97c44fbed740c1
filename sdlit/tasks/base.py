"""Problems and tasks: a task is a source of problems plus a way to check answers."""

from __future__ import annotations

from dataclasses import dataclass

from sdlit.tasks import answers


class DataError(ValueError):
    """Bad input data. The message names the file (or dataset), the 1-based row and the field."""


@dataclass(frozen=True)
class Problem:
    """One problem with its worked reference solution.

    Attributes:
        question: the problem statement.
        solution: the worked reference solution in GSM8K format: lines with <<a op b=c>> annotations,
            last line "#### <answer>".
        answer: the gold final answer as a canonical number string (see answers.normalize_number).
        id: a stable id such as "gsm8k/train/17" or "arith/train/123".
    """

    question: str
    solution: str
    answer: str
    id: str


class Task:
    """Base class: a source of problems plus answer checking.

    Subclasses are selected from YAML by class_path (LightningCLI/jsonargparse), so every setting is a
    typed __init__ argument with a default, documented in the subclass docstring (Args: section).
    """

    name: str = "task"

    def train_problems(self) -> list[Problem]:
        """Problems to train on."""
        raise NotImplementedError(f"{type(self).__name__} does not define train_problems()")

    def eval_problems(self) -> list[Problem]:
        """Held-out problems, disjoint from the training problems."""
        raise NotImplementedError(f"{type(self).__name__} does not define eval_problems()")

    def extract_answer(self, text: str) -> str | None:
        """The normalized final answer of a response, or None (default: answers.extract_answer)."""
        return answers.extract_answer(text)

    def is_correct(self, response: str, gold: str) -> bool:
        """True when the response's final answer equals the gold answer (default: answers.is_correct)."""
        return answers.is_correct(response, gold)
