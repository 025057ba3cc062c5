"""Where the cache lives and how things inside it are named.

One place for the on-disk naming rules, so the store, prune and the CLI all
agree on what is an entry, a temp dir left by a crash, or a lock file.

Layout of a cache root::

    <root>/CACHEDIR.TAG              marks the tree as a cache for backup tools
    <root>/<short>/                  one entry (short = first 16 hex of key digest)
    <root>/<short>/manifest.json     written last; an entry without it is incomplete
    <root>/<short>.lock              per-key flock file (serialises builds)
    <root>/.tmp-<short>-<pid>-<rnd>/ build in progress or left by a killed build
    <root>/.bad-<short>-<rnd>/       entry moved aside before deletion
    <root>/.fingerprints.json        memo of model-file hashes
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

ENV_CACHE_DIR = "LLMCORE_CACHE_DIR"
ENV_SHARED_CACHE_DIR = "LLMCORE_SHARED_CACHE_DIR"

MANIFEST_NAME = "manifest.json"
LOCK_SUFFIX = ".lock"
TMP_PREFIX = ".tmp-"
BAD_PREFIX = ".bad-"
FINGERPRINT_MEMO_NAME = ".fingerprints.json"
CACHEDIR_TAG = "CACHEDIR.TAG"

SHORT_LEN = 16
_ENTRY_NAME_RE = re.compile(r"^[0-9a-f]{%d}$" % SHORT_LEN)
_TMP_NAME_RE = re.compile(r"^\.tmp-([0-9a-f]{%d})-" % SHORT_LEN)

PathLike = Union[str, "os.PathLike[str]"]


def _env_path(name: str) -> Optional[Path]:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/llmcore/compiled, else ~/.cache/llmcore/compiled.

    Does not look at $LLMCORE_CACHE_DIR; use ``resolve_cache_dir`` for the
    directory a ``CompileCache()`` would actually use.
    """
    base = _env_path("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return base / "llmcore" / "compiled"


def resolve_cache_dir(root: Optional[PathLike] = None) -> Path:
    """The effective cache root: explicit arg > $LLMCORE_CACHE_DIR > default."""
    if root is not None:
        return Path(root).expanduser()
    return _env_path(ENV_CACHE_DIR) or default_cache_dir()


def resolve_shared_dir(shared: Optional[PathLike] = None) -> Optional[Path]:
    """The shared (read-through) cache: explicit arg > $LLMCORE_SHARED_CACHE_DIR."""
    if shared is not None:
        return Path(shared).expanduser()
    return _env_path(ENV_SHARED_CACHE_DIR)


def is_entry_name(name: str) -> bool:
    return bool(_ENTRY_NAME_RE.match(name))


def tmp_owner(name: str) -> Optional[str]:
    """The key short of a ``.tmp-<short>-...`` dir name, or None."""
    m = _TMP_NAME_RE.match(name)
    return m.group(1) if m else None


def lock_path(root: Path, short: str) -> Path:
    return root / f"{short}{LOCK_SUFFIX}"
