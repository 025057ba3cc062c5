"""Listing, verifying, pruning, removing and resolving entries (the ``cache`` CLI's backend).

Kept apart from the lookup/build path in store.py. Everything here that
deletes takes the key's lock first (non-blocking) and skips what is locked,
so maintenance never races a build in progress.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Union

from .entry import CacheEntry
from .errors import CacheError, CorruptEntryError, IncompatibleEntryError
from .fsutil import rmtree_quiet, tree_size
from .lock import KeyLock
from .manifest import INCOMPATIBLE, INCOMPLETE, CheckResult, check_entry, read_manifest
from .paths import (BAD_PREFIX, LOCK_SUFFIX, MANIFEST_NAME, SHORT_LEN, TMP_PREFIX, PathLike, is_entry_name,
                    lock_path, tmp_owner)

log = logging.getLogger("llmcore.compile_cache")

_HEX_RE = re.compile(r"^[0-9a-f]+$")


class LsRow(NamedTuple):
    digest: str       # full key digest, or the dir name if the manifest is unreadable
    status: str       # ok | corrupt | incomplete | incompatible
    size: int         # bytes on disk
    created_at: float  # unix time (manifest created_at, else dir mtime)
    summary: str      # model / plugin / shapes, or the problem


class VerifyRow(NamedTuple):
    digest: str
    status: str
    problem: str      # "" when ok


class Maintenance:
    """Mixin for CompileCache; needs ``root``, ``shared``, ``verify_hashes`` and ``_discard``."""

    root: Path
    shared: Optional[Path]
    verify_hashes: bool

    def _discard(self, d: Path) -> None:  # pragma: no cover - provided by CompileCache
        raise NotImplementedError

    def entries(self, verify_hashes: bool = False) -> List[CacheEntry]:
        """Valid entries in root. Quick check (manifest, sizes) unless ``verify_hashes``."""
        out = []
        for d in self._entry_dirs(self.root):
            res = check_entry(d, hashes=verify_hashes)
            if res.ok:
                out.append(CacheEntry.from_manifest(d, res.key, res.manifest))  # type: ignore[arg-type]
        return out

    def ls(self, verify_hashes: bool = False) -> List[LsRow]:
        """Every entry in root with its status, plus leftover temp dirs as "incomplete".

        Quick by default (manifest, key, file sizes); pass ``verify_hashes``
        (or use ``verify``) to also hash every file.
        """
        return [LsRow(r["digest"], r["status"], r["size_bytes"], r["created_at"], r["summary"])
                for r in self.ls_details(verify_hashes)]

    def ls_details(self, verify_hashes: bool = False) -> List[Dict[str, Any]]:
        """Like ``ls`` but dicts with more fields: digest, short, status, size_bytes,
        created_at, last_used, summary, problem, path (str), metadata."""
        rows: List[Dict[str, Any]] = []
        for d in self._entry_dirs(self.root):
            res = check_entry(d, hashes=verify_hashes)
            m = res.manifest or {}
            created = float(m["created_at"]) if isinstance(m.get("created_at"), (int, float)) else _mtime(d)
            rows.append({
                "digest": res.digest, "short": d.name, "status": res.status, "size_bytes": tree_size(d),
                "created_at": created, "last_used": _last_used(d, created),
                "summary": _summary(res) if res.ok else res.problem, "problem": res.problem,
                "path": str(d), "metadata": m.get("metadata") if isinstance(m.get("metadata"), dict) else {},
            })
        for p in self._leftovers():
            owner = tmp_owner(p.name)
            if p.name.startswith(BAD_PREFIX):
                why = "bad entry being deleted; `cache prune` removes it"
            elif owner is not None and _is_locked(lock_path(self.root, owner)):
                why = "build in progress"
            else:
                why = "left by an interrupted build; `cache prune` removes it"
            rows.append({
                "digest": p.name, "short": p.name, "status": INCOMPLETE, "size_bytes": tree_size(p),
                "created_at": _mtime(p), "last_used": _mtime(p), "summary": why, "problem": why,
                "path": str(p), "metadata": {},
            })
        return rows

    def verify(self, digest_prefix: Optional[str] = None) -> List[VerifyRow]:
        """Fully check (sha256 of every file) all entries in root, or those matching a prefix."""
        dirs = self._entry_dirs(self.root)
        if digest_prefix:
            dirs = self._match(_clean_ref(digest_prefix), include_shared=False)
            if not dirs:
                raise CacheError(_not_found(digest_prefix, self.root))
        rows = []
        for d in dirs:
            res = check_entry(d, hashes=True)
            rows.append(VerifyRow(res.digest, res.status, res.problem))
        return rows

    def prune(self, older_than_seconds: Optional[float] = None, invalid_only: bool = False,
              dry_run: bool = False) -> List[Path]:
        """Remove temp dirs left by crashes and invalid entries; with ``older_than_seconds``
        also valid entries not used (hit or built) for that long.

        ``invalid_only`` guarantees no valid entry is removed (so it cannot be
        combined with ``older_than_seconds``). Anything whose key lock is held
        (a build in progress) is skipped. Returns the paths removed (or that
        would be, with ``dry_run``).
        """
        if invalid_only and older_than_seconds is not None:
            raise CacheError("invalid_only and older_than_seconds cannot be combined: "
                             "invalid_only never removes valid entries")
        if not self.root.is_dir():
            return []
        now = time.time()
        removed: List[Path] = []
        for p in self._leftovers():
            owner = tmp_owner(p.name)
            if owner is None:  # .bad-* dirs: already detached from any key
                if dry_run or rmtree_quiet(p):
                    removed.append(p)
                continue
            with _try_lock(self.root, owner) as lock:
                if lock is None:
                    log.info("prune: skipping %s (its key is locked: build in progress)", p)
                elif dry_run or rmtree_quiet(p):
                    removed.append(p)
        for d in self._entry_dirs(self.root):
            with _try_lock(self.root, d.name) as lock:
                if lock is None:
                    log.info("prune: skipping %s (locked by another process)", d)
                    continue
                res = check_entry(d, hashes=True)
                if res.ok:
                    created = float((res.manifest or {}).get("created_at") or _mtime(d))
                    if older_than_seconds is None or now - _last_used(d, created) <= older_than_seconds:
                        continue
                    why = "unused for longer than the cutoff"
                else:
                    why = f"{res.status}: {res.problem}"
                log.info("prune: %s %s (%s)", "would remove" if dry_run else "removing", d, why)
                if not dry_run:
                    self._discard(d)
                removed.append(d)
        removed.extend(self._remove_stray_files(now, dry_run))
        if not dry_run:
            self._remove_orphan_locks()
        return removed

    def remove(self, digest_or_prefix: str) -> Path:
        """Remove one entry from root by full digest or unique prefix; returns its path."""
        ref = _clean_ref(digest_or_prefix)
        matches = self._match(ref, include_shared=False)
        if not matches:
            if self.shared is not None and self._match(ref, include_shared=True):
                raise CacheError(f"{digest_or_prefix!r} is only in the read-only shared cache {self.shared}")
            raise CacheError(_not_found(digest_or_prefix, self.root))
        if len(matches) > 1:
            raise CacheError(_ambiguous(digest_or_prefix, matches))
        d = matches[0]
        with _try_lock(self.root, d.name) as lock:
            if lock is None:
                raise CacheError(f"entry {d.name} is locked by another process (being built?); try again later")
            self._discard(d)
            lock.unlink_and_release()
        log.info("removed compile cache entry %s", d)
        return d

    def resolve(self, ref: Union[str, PathLike]) -> CacheEntry:
        """A verified entry from a full digest, a unique prefix, or an entry directory path.

        Raises CacheError if nothing or several entries match, and
        CorruptEntryError / IncompatibleEntryError if the entry is bad.
        """
        text = os.fspath(ref)
        if isinstance(ref, os.PathLike) or os.sep in text or "/" in text or text.startswith((".", "~")):
            d = Path(text).expanduser()
            if d.name == MANIFEST_NAME:
                d = d.parent
            if not d.is_dir():
                raise CacheError(f"no cache entry directory at {d}")
        else:
            clean = _clean_ref(text)
            matches = self._match(clean, include_shared=True)
            if not matches:
                raise CacheError(_not_found(text, self.root, self.shared))
            if len(matches) > 1:
                raise CacheError(_ambiguous(text, matches))
            d = matches[0]
        res = check_entry(d, hashes=self.verify_hashes)
        if res.status == INCOMPATIBLE:
            raise IncompatibleEntryError(d, res.problem)
        if not res.ok:
            raise CorruptEntryError(d, f"{res.status}: {res.problem}")
        return CacheEntry.from_manifest(d, res.key, res.manifest)  # type: ignore[arg-type]

    def _remove_stray_files(self, now: float, dry_run: bool) -> List[Path]:
        """Temp *files* (e.g. a memo write killed mid-way) older than an hour."""
        out = []
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return out
        for n in names:
            p = self.root / n
            if n.startswith((TMP_PREFIX, BAD_PREFIX)) and (p.is_symlink() or p.is_file()):
                if now - _mtime(p) > 3600 and (dry_run or rmtree_quiet(p)):
                    out.append(p)
        return out

    def _remove_orphan_locks(self) -> None:
        try:
            names = set(os.listdir(self.root))
        except OSError:
            return
        owners = {tmp_owner(n) for n in names}
        for name in names:
            short = name[: -len(LOCK_SUFFIX)]
            if not (name.endswith(LOCK_SUFFIX) and is_entry_name(short)):
                continue
            if short in names or short in owners:
                continue
            lock = KeyLock(self.root / name)
            if lock.acquire(timeout=0):
                if os.path.lexists(self.root / short):
                    lock.release()
                else:
                    lock.unlink_and_release()

    @staticmethod
    def _entry_dirs(base: Optional[Path]) -> List[Path]:
        if base is None:
            return []
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return []
        return [base / n for n in names if is_entry_name(n) and (base / n).is_dir() and not (base / n).is_symlink()]

    def _leftovers(self) -> List[Path]:
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return []
        return [self.root / n for n in names if n.startswith((TMP_PREFIX, BAD_PREFIX))
                and (self.root / n).is_dir() and not (self.root / n).is_symlink()]

    def _match(self, ref: str, include_shared: bool) -> List[Path]:
        """Entry dirs whose digest starts with ``ref`` (root wins over shared for one digest)."""
        seen: Dict[str, Path] = {}
        bases = [self.root] + ([self.shared] if include_shared and self.shared is not None else [])
        for base in bases:
            for d in self._entry_dirs(base):
                if not d.name.startswith(ref[:SHORT_LEN]):
                    continue
                if len(ref) > SHORT_LEN and not read_manifest(d).digest.startswith(ref):
                    continue
                seen.setdefault(d.name, d)
        return list(seen.values())


# ---------------------------------------------------------------------- helpers


class _try_lock:
    """Context manager yielding a held KeyLock, or None if someone else holds it."""

    def __init__(self, root: Path, short: str) -> None:
        self.lock = KeyLock(lock_path(root, short))

    def __enter__(self) -> Optional[KeyLock]:
        return self.lock if self.lock.acquire(timeout=0) else None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _is_locked(path: Path) -> bool:
    if not path.exists():
        return False
    lock = KeyLock(path)
    if lock.acquire(timeout=0):
        lock.release()
        return False
    return True


def _mtime(p: Path) -> float:
    try:
        return os.stat(p).st_mtime
    except OSError:
        return 0.0


def _last_used(d: Path, created: float) -> float:
    return max(created, _mtime(d))


def _summary(res: CheckResult) -> str:
    assert res.key is not None
    meta = (res.manifest or {}).get("metadata") or {}
    model = meta.get("model") or meta.get("model_name") or meta.get("model_id")
    model = str(model) if model else res.key.model_fingerprint[:19]
    return f"{model} {res.key.summary()}"


def _clean_ref(ref: str) -> str:
    clean = ref.strip().lower()
    if clean.startswith("sha256:"):
        clean = clean[len("sha256:"):]
    if not clean or not _HEX_RE.match(clean):
        raise CacheError(f"{ref!r} is not a key digest, a digest prefix, or a path to an entry directory")
    return clean


def _not_found(ref: str, root: Path, shared: Optional[Path] = None) -> str:
    where = f"{root}" + (f" or the shared cache {shared}" if shared else "")
    return f"no compile cache entry matches {ref!r} in {where}; run `llmcore cache ls` to list entries"


def _ambiguous(ref: str, matches: List[Path]) -> str:
    names = ", ".join(sorted({m.name for m in matches}))
    return f"{ref!r} matches several entries ({names}); give more characters of the digest"
