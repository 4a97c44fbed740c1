"""GSM8K grade-school math: problems from JSONL/Parquet files or a `datasets` dataset.

A small subset (the first 256 train and 128 test rows, MIT licence in data/GSM8K_LICENSE) ships with
the package so that the default works offline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from sdlit.tasks.answers import extract_answer, is_correct, normalize_number
from sdlit.tasks.base import DataError, Problem, Task
from sdlit.tasks.rows import file_rows
from sdlit.tasks.solutions import final_answer

__all__ = ["GSM8K", "read_problems", "extract_answer", "is_correct", "DATA_DIR"]

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).parent / "data"


def parse_row(row: object, source: str, number: int, id: str) -> Problem:
    """One GSM8K row {"question", "answer"} as a Problem; DataError names source, row and field."""
    where = f"{source}: row {number}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields 'question' and 'answer'")
    for field in ("question", "answer"):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{field}' is missing or empty")
    solution = row["answer"].strip()
    final = final_answer(solution)
    gold = normalize_number(final) if final is not None else None
    if gold is None:
        raise DataError(f"{where}: field 'answer': gold answer is not a number (expected a last line '#### <number>')")
    return Problem(question=row["question"].strip(), solution=solution, answer=gold, id=id)


def _parse_rows(rows, source: str, prefix: str, on_bad_row: str, parse=parse_row) -> tuple[list[Problem], int]:
    """Parse (row number, row) pairs with ``parse``; returns (problems, number of skipped bad rows)."""
    problems, skipped = [], 0
    for number, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            problems.append(parse(row, source, number, f"{prefix}/{number - 1}"))
        except DataError as e:
            if on_bad_row != "skip":
                raise
            skipped += 1
            log.warning("skipping bad row: %s", e)
    if not problems:
        detail = f" ({skipped} bad rows skipped)" if skipped else ""
        raise DataError(f"{source}: no problems: the file or split is empty{detail}")
    if skipped:
        log.warning("%s: skipped %d bad rows, kept %d problems", source, skipped, len(problems))
    return problems, skipped


def read_problems_counted(
    path: str | Path, prefix: str, on_bad_row: str = "error", parse=parse_row
) -> tuple[list[Problem], int]:
    """Like read_problems, but also returns how many bad rows were skipped; ``parse`` reads one row."""
    path = Path(path)
    return _parse_rows(file_rows(path), str(path), prefix, on_bad_row, parse)


def read_problems(
    path: str | Path, prefix: str = "gsm8k", on_bad_row: Literal["error", "skip"] = "error"
) -> list[Problem]:
    """Read GSM8K-format problems (fields `question`, `answer`) from a .jsonl or .parquet file.

    Args:
        path: the file.
        prefix: id prefix; a problem's id is "<prefix>/<0-based row index>".
        on_bad_row: "error" raises DataError naming the file, 1-based row and field; "skip" skips bad
            rows with a logged warning.
    """
    return read_problems_counted(path, prefix, on_bad_row)[0]


class GSM8K(Task):
    """GSM8K grade-school math word problems.

    Args:
        train_path: JSONL/Parquet file of training problems. Default: the vendored subset (256 rows)
            unless `dataset` is given.
        eval_path: JSONL/Parquet file of held-out problems. Default: the vendored subset (128 test rows)
            unless `dataset` is given.
        dataset: a name `datasets.load_dataset` accepts (e.g. "openai/gsm8k"), used for a split whose
            path is not given. Loaded lazily.
        dataset_config: the dataset configuration name.
        train_split: dataset split for training problems.
        eval_split: dataset split for held-out problems.
        train_size: keep only the first this many training problems (None: all).
        eval_size: keep only the first this many held-out problems (None: all).
        on_bad_row: "error" stops at the first bad row with a DataError naming file, row and field;
            "skip" skips bad rows, logs a warning and counts them in `skipped_rows`.
    """

    name = "gsm8k"

    def __init__(
        self,
        train_path: str | None = None,
        eval_path: str | None = None,
        dataset: str | None = None,
        dataset_config: str | None = "main",
        train_split: str = "train",
        eval_split: str = "test",
        train_size: int | None = None,
        eval_size: int | None = None,
        on_bad_row: Literal["error", "skip"] = "error",
    ) -> None:
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.train_path, self.eval_path = train_path, eval_path
        self.dataset, self.dataset_config = dataset, dataset_config
        self.train_split, self.eval_split = train_split, eval_split
        self.train_size, self.eval_size = train_size, eval_size
        self.on_bad_row = on_bad_row
        self.skipped_rows = 0
        self._cache: dict[str, list[Problem]] = {}

    def train_problems(self) -> list[Problem]:
        """The training problems (cached after the first call)."""
        return self._problems("train", self.train_path, self.train_split, self.train_size)

    def eval_problems(self) -> list[Problem]:
        """The held-out problems (cached after the first call)."""
        return self._problems("eval", self.eval_path, self.eval_split, self.eval_size)

    def _problems(self, role: str, path: str | None, split: str, size: int | None) -> list[Problem]:
        """Load, cache and truncate one split."""
        if role not in self._cache:
            if path is None and self.dataset is not None:
                problems, skipped = self._load_dataset(split)
            else:
                problems, skipped = read_problems_counted(
                    path or self.default_path(role), f"{self.name}/{split}", self.on_bad_row, self.parse_row
                )
            self.skipped_rows += skipped
            self._cache[role] = problems
        return self._cache[role][:size] if size is not None else self._cache[role]

    def default_path(self, role: str) -> Path:
        """The vendored file of a split ("train" or "eval"), used when no path or dataset is given."""
        return DATA_DIR / ("gsm8k_train.jsonl" if role == "train" else "gsm8k_test.jsonl")

    def parse_row(self, row: object, source: str, number: int, id: str) -> Problem:
        """One row as a Problem (GSM8K fields); a DataError names source, row and field."""
        return parse_row(row, source, number, id)

    def _load_dataset(self, split: str) -> tuple[list[Problem], int]:
        """Load one split with `datasets.load_dataset`."""
        import datasets

        source = f"dataset {self.dataset}[{split}]"
        try:
            data = datasets.load_dataset(self.dataset, self.dataset_config, split=split)
        except Exception as e:  # datasets raises many types; keep one clear message
            raise DataError(f"{source}: could not be loaded ({e})") from e
        return _parse_rows(enumerate(data, start=1), source, f"{self.name}/{split}", self.on_bad_row, self.parse_row)
