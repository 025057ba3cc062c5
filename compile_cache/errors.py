"""Errors raised by compile_cache.

They are separate classes so callers can tell "the cache cannot do what you
asked" (``CacheError``) from "this entry exists but must not be used"
(``CorruptEntryError`` / ``IncompatibleEntryError``); the latter carry the
entry path and the problem so a CLI or log line can say what to delete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class CacheError(Exception):
    """Base class for every error compile_cache raises on purpose."""


class _EntryError(CacheError):
    status = "corrupt"

    def __init__(self, path: Optional[Path], problem: str) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem
        where = f" at {self.path}" if self.path is not None else ""
        super().__init__(f"{self.status} cache entry{where}: {problem}")


class CorruptEntryError(_EntryError):
    """An entry is damaged or partial (bad hash, missing file, bad manifest)."""

    status = "corrupt"


class IncompatibleEntryError(_EntryError):
    """An entry was written by an incompatible version of this package."""

    status = "incompatible"
