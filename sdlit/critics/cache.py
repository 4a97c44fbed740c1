"""An on-disk cache of critic replies, keyed by a hash of everything that determines the reply.

A rerun of the same training (same model, same prompts, same sampling settings) reads its critiques from
here instead of asking the critic again. Each entry is one small JSON file written atomically (a temporary
file in the same folder, then ``os.replace``), so a crash never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ReplyCache", "cache_key"]

log = logging.getLogger(__name__)


def cache_key(inputs: dict[str, Any]) -> str:
    """SHA-256 (hex) of the inputs as canonical JSON (sorted keys): model, messages, sampling settings."""
    blob = json.dumps(inputs, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """Critic replies stored as ``<directory>/<key[:2]>/<key>.json``.

    Args:
        directory: Folder of the cache (created on the first write).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached reply for ``key``, or None. An unreadable entry counts as a miss (and is rewritten)."""
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            reply = entry["reply"]
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("critic cache entry %s is unreadable (%s); asking the critic again", path, err)
            self.misses += 1
            return None
        self.hits += 1
        return reply

    def put(self, key: str, reply: str, meta: dict[str, Any] | None = None) -> None:
        """Store ``reply`` (with optional metadata, e.g. the model name) atomically."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"reply": reply, **(meta or {})}, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
