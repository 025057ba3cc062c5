"""CacheEntry: a verified entry as handed to callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from .errors import CacheError
from .key import CacheKey
from .manifest import safe_relpath


@dataclass(frozen=True)
class CacheEntry:
    """A checked entry. ``files`` are relative posix paths; use ``file(name)`` to open one.

    Treat the directory as read-only: files written into it later make the
    entry fail verification ("unexpected file") and it would be rebuilt.
    """

    key: CacheKey
    digest: str
    path: Path
    metadata: Dict[str, Any]
    files: List[str]
    created_at: float
    size_bytes: int
    manifest: Dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_manifest(cls, path: Path, key: CacheKey, manifest: Dict[str, Any]) -> "CacheEntry":
        files = [rec["path"] for rec in manifest["files"]]
        return cls(
            key=key,
            digest=manifest["key_digest"],
            path=Path(path),
            metadata=dict(manifest.get("metadata") or {}),
            files=files,
            created_at=float(manifest.get("created_at") or 0.0),
            size_bytes=sum(int(rec["size"]) for rec in manifest["files"]),
            manifest=manifest,
        )

    @property
    def short(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        """Path of artifact ``name`` (relative path as listed in ``files``)."""
        rel = safe_relpath(name)
        if rel is None or rel not in self.files:
            listing = ", ".join(self.files[:10]) + (" ..." if len(self.files) > 10 else "")
            raise CacheError(f"entry {self.short} has no file {name!r}; it has: {listing}")
        return self.path / rel
