"""Per-token advantage records: one scored rollout under one teacher context, saved as a JSONL line.

A record holds what the figures and tables need and nothing model-specific: the response's tokens as text,
A_t = log p_teacher(y_t) - log p_student(y_t) per token, the token span of every step, the critic's first
error (a step index) and the condition (which feedback gave the teacher its context).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from sdlit.steps import token_char_ends

__all__ = ["TokenRecord", "read_records", "token_texts", "write_records"]


@dataclass
class TokenRecord:
    """Per-token advantages of one rollout under one teacher context.

    Attributes:
        tokens: The response tokens as text (special tokens by name); their concatenation is the response.
        advantages: A_t of each token (same length as ``tokens``).
        step_spans: Token span ``[start, end)`` of each step of the response.
        first_error: Index of the earliest wrong step (into ``step_spans``), None when no step is wrong.
        condition: The teacher context's kind, e.g. ``ReferenceSolution`` or ``StepCritique``.
        step: Training step (global step) at which it was scored; 0 outside training.
        problem_id: Id of the problem the rollout answers.
        correct: Whether the rollout's final answer is right (None when not graded).
        case: The critic's case (``correct``, ``missing_step``, ``incomplete``, ``wrong``) when known.
        context_header: The line that introduced the context in the teacher prompt.
    """

    tokens: list[str]
    advantages: list[float]
    step_spans: list[tuple[int, int]]
    first_error: int | None
    condition: str
    step: int = 0
    problem_id: str = ""
    correct: bool | None = None
    case: str | None = None
    context_header: str = ""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.advantages):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.advantages)} advantages")
        self.step_spans = [(int(s), int(e)) for s, e in self.step_spans]
        for start, end in self.step_spans:
            if not 0 <= start <= end <= len(self.tokens):
                raise ValueError(f"step span [{start}, {end}) lies outside the {len(self.tokens)} tokens")
        if self.first_error is not None and not 0 <= self.first_error < len(self.step_spans):
            raise ValueError(f"first_error {self.first_error} is not one of the {len(self.step_spans)} steps")

    @property
    def error_span(self) -> tuple[int, int] | None:
        """Token span of the first wrong step, None when there is none."""
        return None if self.first_error is None else self.step_spans[self.first_error]

    def key(self) -> tuple:
        """Identifies the scored rollout: records with the same key are one rollout under several contexts."""
        return (self.problem_id, self.step, tuple(self.tokens))


_REQUIRED = {"tokens": list, "advantages": list, "step_spans": list, "condition": str}


def write_records(records: list[TokenRecord], path: str | Path, append: bool = False) -> None:
    """Write records as JSON lines (``append`` adds to an existing file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")


def read_records(path: str | Path) -> list[TokenRecord]:
    """Read records written by :func:`write_records`; a bad line is an error naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token-advantage records: no file {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                records.append(_parse(line, f"{path}: line {number}"))
    if not records:
        raise ValueError(f"{path}: no token-advantage records in file")
    return records


def _parse(line: str, where: str) -> TokenRecord:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for name, kind in _REQUIRED.items():
        if not isinstance(row.get(name), kind):
            raise ValueError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
    if not all(isinstance(a, (int, float)) and math.isfinite(a) for a in row["advantages"]):
        raise ValueError(f"{where}: field 'advantages' holds a value that is not a finite number")
    known = {name: row[name] for name in TokenRecord.__dataclass_fields__ if name in row}
    try:
        return TokenRecord(**known)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def token_texts(tokenizer, ids: list[int], text: str | None = None) -> list[str]:
    """Each token of ``ids`` as the piece of decoded text it completes; special tokens by their name.

    Concatenating the pieces of the non-special tokens gives ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True) if text is None else text
    ends = token_char_ends(tokenizer, ids, text)
    special = set(tokenizer.all_special_ids)
    pieces, start = [], 0
    for token, end in zip(ids, ends, strict=False):
        pieces.append(tokenizer.convert_ids_to_tokens(token) if token in special else text[start:end])
        start = end
    return pieces
