"""Small filesystem helpers: streamed hashing, fsync, atomic JSON writes.

Durability matters here: an entry is published by renaming a fully written
and fsync'ed temp dir, so a crash or power loss leaves either the old state
or the complete new entry, never a half-written one that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Optional, Tuple

CHUNK_SIZE = 1 << 20  # 1 MiB: big enough for throughput, small enough for RAM


def sha256_stream(f: BinaryIO, out: Optional[BinaryIO] = None) -> Tuple[str, int]:
    """Hash a binary stream in 1 MiB chunks; optionally copy it to ``out``.

    Returns (hex digest, bytes read). Copying and hashing in one pass lets a
    read-through copy verify exactly the bytes it wrote.
    """
    h = hashlib.sha256()
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    total = 0
    while True:
        n = f.readinto(buf)  # type: ignore[attr-defined]
        if not n:
            break
        h.update(view[:n])
        if out is not None:
            out.write(view[:n])
        total += n
    return h.hexdigest(), total


def sha256_file(path: Path) -> Tuple[str, int]:
    with open(path, "rb") as f:
        return sha256_stream(f)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames/creations inside it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on dirs; best effort
        pass
    finally:
        os.close(fd)


def dump_json(obj: Any) -> str:
    """Pretty JSON for files humans may read; rejects NaN/Infinity."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json_durable(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` and fsync it (caller renames the dir around it)."""
    data = dump_json(obj).encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace ``path`` atomically (temp file + rename) so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-json-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(dump_json(obj).encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def rmtree_quiet(path: Path) -> bool:
    """Remove a tree (or a stray file/symlink); True if it is gone afterwards."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        try:
            os.unlink(path)
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def human_age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, width in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= width:
            return f"{s // width}{unit}"
    return f"{s}s"
