"""CompileCache: the on-disk store (lookup, build-once, publish, maintenance).

Guarantees, and how they are met:

* **Never serve a bad artifact.** Every lookup checks the manifest, the key
  and each file's size and sha256 (``verify_hashes=False`` checks sizes
  only). A bad entry is logged, moved aside and deleted; the caller rebuilds.
* **Atomic publish.** Builds write into ``.tmp-*`` inside the root, the
  manifest goes last, everything is fsync'ed, then one ``rename`` makes the
  entry visible. A killed build leaves only a ``.tmp-*`` dir, which is never
  read as an entry and is removed by ``prune`` or the next build of that key.
* **Compile once.** ``get_or_build`` holds a per-key ``flock``; a second
  process waits, then finds the entry. The kernel frees the lock if the
  holder dies, so there are no stale locks.
* **Shared caches are read-only.** An entry found only in ``shared`` is
  copied into ``root`` (hashing the bytes as they are copied); bad shared
  entries are reported but never modified.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Union

from .entry import CacheEntry
from .errors import CacheError, CorruptEntryError
from .fingerprint import fingerprint_model as _fingerprint_model
from .fsutil import fsync_dir, fsync_file, human_size, rmtree_quiet, sha256_stream, write_json_durable
from .key import CacheKey, canonical_json
from .lock import KeyLock, LockTimeout
from .maintenance import LsRow, Maintenance, VerifyRow
from .manifest import CheckResult, check_entry, file_records, make_manifest, safe_relpath
from .paths import (BAD_PREFIX, CACHEDIR_TAG, FINGERPRINT_MEMO_NAME, MANIFEST_NAME, TMP_PREFIX, PathLike,
                    lock_path, resolve_cache_dir, resolve_shared_dir, tmp_owner)

log = logging.getLogger("llmcore.compile_cache")

__all__ = ["CompileCache", "LsRow", "VerifyRow"]

BuildFn = Callable[[Path], Optional[Mapping[str, Any]]]
Progress = Callable[[str], None]
Sources = Union[PathLike, Iterable[PathLike], Mapping[str, PathLike]]

_CACHEDIR_TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
                      "# This directory is a cache of compiled llmcore models (compile_cache).\n"
                      "# See https://bford.info/cachedir/ ; safe to delete, entries are rebuilt.\n")


class CompileCache(Maintenance):
    """Content-addressed, verified store of compiled artifacts.

    ``root``: writable cache dir (default ``$LLMCORE_CACHE_DIR`` or
    ``default_cache_dir()``); created on first write. ``shared``: optional
    read-only cache consulted after ``root`` (default
    ``$LLMCORE_SHARED_CACHE_DIR``); hits are copied into ``root``.
    """

    def __init__(self, root: Optional[PathLike] = None, shared: Optional[PathLike] = None, *,
                 verify_hashes: bool = True) -> None:
        self.root = resolve_cache_dir(root)
        self.shared = resolve_shared_dir(shared)
        if self.shared is not None and _same_dir(self.shared, self.root):
            self.shared = None
        self.verify_hashes = verify_hashes

    def __repr__(self) -> str:
        return f"CompileCache(root={str(self.root)!r}, shared={str(self.shared) if self.shared else None!r})"

    # ------------------------------------------------------------------ lookup

    def entry_path(self, key: CacheKey) -> Path:
        """Where ``key``'s entry lives (or would live) in ``root``."""
        return self.root / key.short()

    def get(self, key: CacheKey) -> Optional[CacheEntry]:
        """Verified entry for ``key`` from root, else from shared (copied in); None on miss.

        Bad entries in root are logged and removed (unless another process
        holds the key's lock, i.e. is rebuilding it right now).
        """
        digest = key.digest()
        return self._get_local(key, digest, lock_held=False) or self._get_shared(key, digest, lock_held=False)

    def _get_local(self, key: CacheKey, digest: str, lock_held: bool) -> Optional[CacheEntry]:
        d = self.root / key.short()
        if not os.path.lexists(d):
            return None
        res = check_entry(d, digest, hashes=self.verify_hashes)
        if res.ok:
            _touch(d)
            log.debug("compile cache hit %s (%s)", d.name, d)
            return CacheEntry.from_manifest(d, res.key, res.manifest)  # type: ignore[arg-type]
        if not lock_held:
            # Only the lock holder may delete: a builder could be swapping in a good entry.
            lock = KeyLock(lock_path(self.root, d.name))
            if not lock.acquire(timeout=0):
                log.warning("compile cache entry %s is %s (%s); another process holds its lock "
                            "(rebuilding it?), leaving it alone", d.name, res.status, res.problem)
                return None
            try:
                return self._get_local(key, digest, lock_held=True)
            finally:
                lock.release()
        log.warning("compile cache entry %s is %s: %s; removing it so it is rebuilt (%s)",
                    d.name, res.status, res.problem, d)
        self._discard(d)
        return None

    def _get_shared(self, key: CacheKey, digest: str, lock_held: bool) -> Optional[CacheEntry]:
        if self.shared is None:
            return None
        sd = self.shared / key.short()
        if not sd.is_dir():
            return None
        # Sizes and structure now; hashes are checked on the bytes we copy.
        res = check_entry(sd, digest, hashes=False)
        if not res.ok:
            log.warning("shared compile cache entry %s is %s: %s; not using it (the shared cache is "
                        "read-only here; fix or delete it there)", sd, res.status, res.problem)
            return None
        lock = None
        try:
            if not lock_held:
                self._ensure_root()
                lock = KeyLock(lock_path(self.root, sd.name))
                if not lock.acquire(timeout=0):
                    # Someone is writing this key into root right now; use the shared copy in place.
                    lock = None
                    return self._shared_in_place(sd, digest)
                if os.path.lexists(self.root / sd.name):
                    # Appeared (or is bad) in root meanwhile; resolve under the lock.
                    local = self._get_local(key, digest, lock_held=True)
                    if local is not None:
                        return local
            return self._copy_in(sd, res)
        except CorruptEntryError as exc:
            log.warning("shared compile cache entry %s is corrupt: %s; not using it", sd, exc.problem)
            return None
        except OSError as exc:
            log.warning("could not copy shared compile cache entry %s into %s (%s); using it in place",
                        sd, self.root, exc)
            return self._shared_in_place(sd, digest)
        finally:
            if lock is not None:
                lock.release()

    def _shared_in_place(self, sd: Path, digest: str) -> Optional[CacheEntry]:
        res = check_entry(sd, digest, hashes=self.verify_hashes)
        if not res.ok:
            log.warning("shared compile cache entry %s is %s: %s; not using it", sd, res.status, res.problem)
            return None
        return CacheEntry.from_manifest(sd, res.key, res.manifest)  # type: ignore[arg-type]

    def _copy_in(self, sd: Path, res: CheckResult) -> CacheEntry:
        """Copy a shared entry into root, verifying each file's sha256 on the copied bytes."""
        assert res.manifest is not None and res.key is not None
        tmp = self._make_tmp(sd.name)
        try:
            for rec in res.manifest["files"]:
                src, dst = sd / rec["path"], tmp / rec["path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as fi, open(dst, "wb") as fo:
                    sha, size = sha256_stream(fi, fo)
                    fo.flush()
                    os.fsync(fo.fileno())
                if sha != rec["sha256"] or size != rec["size"]:
                    raise CorruptEntryError(sd, f"file {rec['path']!r} sha256/size mismatch")
                shutil.copymode(src, dst)
            raw = (sd / MANIFEST_NAME).read_bytes()
            if _loads_or_none(raw) != res.manifest:
                raise CorruptEntryError(sd, "manifest changed while the entry was being copied")
            with open(tmp / MANIFEST_NAME, "wb") as f:  # verbatim: the entry stays byte-identical
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            final = self._publish(tmp, sd.name)
        except BaseException:
            rmtree_quiet(tmp)
            raise
        log.info("copied compile cache entry %s from shared cache %s", sd.name, self.shared)
        return CacheEntry.from_manifest(final, res.key, res.manifest)

    # ------------------------------------------------------------------ writing

    def get_or_build(self, key: CacheKey, build_fn: BuildFn, metadata: Optional[Mapping[str, Any]] = None,
                     progress: Optional[Progress] = None, *, lock_timeout: Optional[float] = None) -> CacheEntry:
        """Return the entry for ``key``, building it with ``build_fn(tmpdir)`` at most once.

        ``build_fn`` writes artifact files into ``tmpdir`` and may return a
        JSON-able dict merged over ``metadata``. ``progress(message)`` gets
        human-readable status lines (waiting for lock, compiling, stored).
        ``lock_timeout`` (seconds) bounds the wait for another process's build.
        """
        say = _sayer(progress)
        entry = self.get(key)
        if entry is not None:
            return entry
        short = key.short()
        self._ensure_root()
        lock = KeyLock(lock_path(self.root, short))

        def on_wait(owner: str) -> None:
            who = f" (pid {owner})" if owner.isdigit() else ""
            say(f"waiting for another process{who} that is compiling {short}")

        if not lock.acquire(timeout=lock_timeout, on_wait=on_wait):
            raise LockTimeout(f"timed out after {lock_timeout}s waiting for {lock.path}: another process "
                             f"is compiling {short}; retry, or raise lock_timeout")
        try:
            digest = key.digest()
            entry = self._get_local(key, digest, lock_held=True) or self._get_shared(key, digest, lock_held=True)
            if entry is not None:
                say(f"found {short} in cache")
                return entry
            self._remove_tmp_dirs(short)  # leftovers of killed builds of this key
            tmp = self._make_tmp(short)
            t0 = time.monotonic()
            try:
                say(f"compiling {short}: {key.summary()}")
                result = build_fn(tmp)
                if result is not None and not isinstance(result, Mapping):
                    raise CacheError(f"build_fn must return a dict or None, got {type(result).__name__}")
                meta: Dict[str, Any] = dict(metadata or {})
                meta.update(result or {})
                entry = self._commit(key, tmp, meta, time.monotonic() - t0)
            except BaseException:
                rmtree_quiet(tmp)
                raise
            if progress is not None:  # _commit already logged it
                progress(f"stored {short} ({human_size(entry.size_bytes)}, built in {time.monotonic() - t0:.1f}s)")
            return entry
        finally:
            lock.release()

    def put(self, key: CacheKey, src: Sources, metadata: Optional[Mapping[str, Any]] = None, *,
            replace: bool = False) -> CacheEntry:
        """Store already-built artifacts atomically (files are copied).

        ``src``: a directory (its contents), a file, an iterable of files
        (stored by basename) or a mapping {relative name: file}. If a valid
        entry exists it is kept and returned unless ``replace=True``.
        """
        self._ensure_root()
        short, digest = key.short(), key.digest()
        with KeyLock(lock_path(self.root, short)):
            if not replace:
                existing = self._get_local(key, digest, lock_held=True)
                if existing is not None:
                    log.info("compile cache entry %s already exists; keeping it (replace=True to overwrite)", short)
                    return existing
            tmp = self._make_tmp(short)
            try:
                _copy_sources(src, tmp)
                return self._commit(key, tmp, dict(metadata or {}), None)
            except BaseException:
                rmtree_quiet(tmp)
                raise

    def _commit(self, key: CacheKey, tmp: Path, meta: Dict[str, Any], build_seconds: Optional[float]) -> CacheEntry:
        if os.path.lexists(tmp / MANIFEST_NAME):
            raise CacheError(f"artifacts must not include a file named {MANIFEST_NAME!r}: the cache writes it")
        try:
            canonical_json(meta)
        except (TypeError, ValueError) as exc:
            raise CacheError(f"entry metadata must be JSON-serialisable: {exc}") from None
        files = file_records(tmp)
        if not files:
            raise CacheError(f"no artifact files were written for {key.short()}; nothing to cache")
        for rec in files:
            fsync_file(tmp / rec["path"])
        manifest = make_manifest(key, files, meta, build_seconds)
        write_json_durable(tmp / MANIFEST_NAME, manifest)
        final = self._publish(tmp, key.short())
        log.info("stored compile cache entry %s (%s) at %s", key.short(), human_size(manifest["total_size"]), final)
        return CacheEntry.from_manifest(final, key, manifest)

    def _publish(self, tmp: Path, short: str) -> Path:
        """fsync the temp tree, then rename it into place (caller holds the key lock)."""
        for dirpath, _dirs, _files in os.walk(tmp, topdown=False):
            fsync_dir(Path(dirpath))
        final = self.root / short
        if os.path.lexists(final):
            self._discard(final)
        os.rename(tmp, final)
        fsync_dir(self.root)
        return final

    def fingerprint_model(self, path: PathLike) -> str:
        """``fingerprint_model`` memoised in this cache's root."""
        return _fingerprint_model(path, memo_file=self.root / FINGERPRINT_MEMO_NAME)

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tag = self.root / CACHEDIR_TAG
        if not tag.exists():
            try:
                tag.write_text(_CACHEDIR_TAG_TEXT)
            except OSError:
                pass

    def _make_tmp(self, short: str) -> Path:
        # os.mkdir (not mkdtemp) so the final entry gets umask permissions, not 0700.
        while True:
            p = self.root / f"{TMP_PREFIX}{short}-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(p)
                return p
            except FileExistsError:
                continue

    def _discard(self, d: Path) -> None:
        """Move an entry aside atomically (readers never see it half-deleted), then delete it."""
        aside = self.root / f"{BAD_PREFIX}{d.name}-{secrets.token_hex(4)}"
        try:
            os.rename(d, aside)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not move bad compile cache entry %s aside: %s", d, exc)
            rmtree_quiet(d)
            return
        if not rmtree_quiet(aside):
            log.warning("could not delete %s; `cache prune` will retry", aside)

    def _remove_tmp_dirs(self, short: str) -> None:
        """Delete temp dirs of ``short`` (caller holds its lock, so their writers are dead)."""
        for p in self._leftovers():
            if tmp_owner(p.name) == short:
                log.info("removing %s left by an interrupted build", p)
                rmtree_quiet(p)


# ---------------------------------------------------------------------- helpers


def _copy_sources(src: Sources, dst: Path) -> None:
    def copy_file(f: Path, rel: str) -> None:
        safe = safe_relpath(rel)
        if safe is None:
            raise CacheError(f"unsafe artifact name {rel!r}")
        if not f.is_file():
            raise CacheError(f"artifact {f} is not a file")
        target = dst / safe
        if target.exists():
            raise CacheError(f"two artifacts would be stored as {safe!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)

    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if p.is_dir():
            shutil.copytree(p, dst, dirs_exist_ok=True)  # follows symlinks: entries are self-contained
            return
        if not p.exists():
            raise CacheError(f"cannot store {p}: no such file or directory")
        copy_file(p, p.name)
    elif isinstance(src, Mapping):
        for rel, f in src.items():
            copy_file(Path(f), str(rel))
    else:
        for f in src:
            copy_file(Path(f), Path(f).name)


def _loads_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError:
        return None


def _sayer(progress: Optional[Progress]) -> Progress:
    def say(msg: str) -> None:
        log.info("%s", msg)
        if progress is not None:
            progress(msg)

    return say


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


def _touch(d: Path) -> None:
    """Mark an entry as used (dir mtime) so ``prune --older-than`` keeps what is in use."""
    try:
        os.utime(d)
    except OSError:
        pass
