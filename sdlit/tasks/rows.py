"""Rows of JSONL and Parquet files, numbered from 1 so that errors can name them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from sdlit.tasks.base import DataError


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based row number, row) for each non-blank line; a malformed line gives a DataError as its row."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, DataError(f"{path}: row {number}: malformed JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row) for each row of a Parquet file."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def file_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a .jsonl or .parquet file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")
