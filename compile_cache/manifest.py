"""Entry manifests: how an entry is described, and how it is checked.

The manifest (``manifest.json``) is written last and lists every artifact
file with its size and sha256, the full key and its digest, the format
version, build metadata and the build environment. An entry is trusted only
if all of that checks out; anything else gets a status and a reason:

* ``incomplete``   - no manifest, or a listed file is missing
* ``corrupt``      - unreadable manifest, size/hash mismatch, key mismatch,
                     unexpected files, unsafe paths
* ``incompatible`` - another format_version or a key this version cannot read
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional

from .fsutil import sha256_file
from .key import CacheKey
from .paths import MANIFEST_NAME, SHORT_LEN

# When bumping FORMAT_VERSION, bump key.KEY_SCHEMA too: digests then change,
# so entries of different formats never share a directory and old and new
# versions of this package can share one cache root without deleting each
# other's entries as "incompatible".
FORMAT_VERSION = 1

OK = "ok"
CORRUPT = "corrupt"
INCOMPLETE = "incomplete"
INCOMPATIBLE = "incompatible"
STATUSES = (OK, CORRUPT, INCOMPLETE, INCOMPATIBLE)


def environment_info() -> Dict[str, Any]:
    """Build-host facts recorded for diagnosis (not part of the key)."""
    from . import __version__

    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": sys.platform,
        "machine": platform.machine(),
        "compile_cache": __version__,
    }


def safe_relpath(rel: str) -> Optional[str]:
    """Normalise a manifest path; None if absolute, escaping, or otherwise unsafe."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts):
        return None
    return p.as_posix()


def list_files(root: Path) -> List[str]:
    """Relative posix paths of all files under root except the manifest; symlinks listed too."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def file_records(root: Path) -> List[Dict[str, Any]]:
    """Hash every file under ``root`` (symlinks refused: entries must be self-contained)."""
    records = []
    for rel in list_files(root):
        p = root / rel
        if p.is_symlink() or not p.is_file():
            from .errors import CacheError

            raise CacheError(f"cache entries may only contain regular files; {rel!r} is a symlink or special file")
        sha, size = sha256_file(p)
        records.append({"path": rel, "size": size, "sha256": sha})
    return records


def make_manifest(key: CacheKey, files: List[Dict[str, Any]], metadata: Dict[str, Any],
                  build_seconds: Optional[float] = None) -> Dict[str, Any]:
    now = time.time()
    return {
        "format_version": FORMAT_VERSION,
        "key_digest": key.digest(),
        "key": key.to_dict(),
        "created_at": now,
        "created_at_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "build_seconds": build_seconds,
        "files": files,
        "total_size": sum(f["size"] for f in files),
        "metadata": metadata,
        "environment": environment_info(),
    }


@dataclass
class CheckResult:
    """Outcome of checking one entry dir; ``manifest``/``key`` set when readable."""

    path: Path
    status: str
    problem: str = ""
    manifest: Optional[Dict[str, Any]] = None
    key: Optional[CacheKey] = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def digest(self) -> str:
        if self.manifest and isinstance(self.manifest.get("key_digest"), str):
            return self.manifest["key_digest"]
        return self.path.name


def read_manifest(entry_dir: Path) -> CheckResult:
    """Parse and structurally validate the manifest, without touching artifact files."""
    mpath = entry_dir / MANIFEST_NAME
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        return CheckResult(entry_dir, INCOMPLETE, f"{MANIFEST_NAME} is missing (interrupted write or foreign dir)")
    except OSError as exc:
        return CheckResult(entry_dir, CORRUPT, f"cannot read {MANIFEST_NAME}: {exc}")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return CheckResult(entry_dir, CORRUPT, f"{MANIFEST_NAME} is not valid JSON: {exc}")
    if not isinstance(m, dict):
        return CheckResult(entry_dir, CORRUPT, f"{MANIFEST_NAME} is not a JSON object")
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        return CheckResult(entry_dir, INCOMPATIBLE,
                           f"format_version {version!r}, this version of compile_cache reads {FORMAT_VERSION}", m)
    try:
        key = CacheKey.from_dict(m.get("key") or {})
    except (TypeError, ValueError) as exc:
        return CheckResult(entry_dir, INCOMPATIBLE, f"manifest key cannot be read: {exc}", m)
    digest = key.digest()
    if m.get("key_digest") != digest:
        return CheckResult(entry_dir, CORRUPT,
                           f"manifest key hashes to {digest[:SHORT_LEN]}, not to its key_digest "
                           f"{str(m.get('key_digest'))[:SHORT_LEN]}", m)
    if entry_dir.name != digest[:SHORT_LEN]:
        return CheckResult(entry_dir, CORRUPT,
                           f"directory name {entry_dir.name!r} does not match key digest {digest[:SHORT_LEN]}", m, key)
    files = m.get("files")
    if not isinstance(files, list) or not files:
        return CheckResult(entry_dir, CORRUPT, "manifest has no file list", m, key)
    seen = set()
    for rec in files:
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str)):
            return CheckResult(entry_dir, CORRUPT, f"malformed file record {rec!r}", m, key)
        rel = safe_relpath(rec.get("path"))
        if rel is None or rel == MANIFEST_NAME or rel in seen:
            return CheckResult(entry_dir, CORRUPT, f"unsafe or duplicate file path {rec.get('path')!r}", m, key)
        seen.add(rel)
    if not isinstance(m.get("metadata", {}), dict):
        return CheckResult(entry_dir, CORRUPT, "manifest metadata is not an object", m, key)
    return CheckResult(entry_dir, OK, "", m, key)


def check_entry(entry_dir: Path, expected_digest: Optional[str] = None, hashes: bool = True) -> CheckResult:
    """Full check: manifest, key, every file's size (and sha256 unless ``hashes=False``)."""
    res = read_manifest(entry_dir)
    if not res.ok:
        return res
    assert res.manifest is not None
    if expected_digest is not None and res.digest != expected_digest:
        res.status, res.problem = CORRUPT, f"manifest is for key {res.digest[:SHORT_LEN]}, expected {expected_digest[:SHORT_LEN]}"
        return res
    listed = set()
    for rec in res.manifest["files"]:
        rel = rec["path"]
        listed.add(rel)
        p = entry_dir / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            res.status, res.problem = INCOMPLETE, f"file {rel!r} listed in manifest is missing"
            return res
        if not os.path.isfile(p) or os.path.islink(p):
            res.status, res.problem = CORRUPT, f"{rel!r} is not a regular file"
            return res
        if st.st_size != rec["size"]:
            res.status, res.problem = CORRUPT, f"file {rel!r} has {st.st_size} bytes, manifest says {rec['size']} (truncated or overwritten)"
            return res
        if hashes:
            try:
                sha, _ = sha256_file(p)
            except OSError as exc:
                res.status, res.problem = CORRUPT, f"cannot read {rel!r}: {exc}"
                return res
            if sha != rec["sha256"]:
                res.status, res.problem = CORRUPT, f"file {rel!r} sha256 mismatch (content changed on disk)"
                return res
    extra = [rel for rel in list_files(entry_dir) if rel not in listed]
    if extra:
        res.status, res.problem = CORRUPT, f"unexpected file(s) not in manifest: {', '.join(extra[:5])}"
    return res
