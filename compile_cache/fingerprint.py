"""Model fingerprints: a content hash of what a compiled graph depends on.

Keying on a model *name* or path is how caches serve stale artifacts after
weights are re-downloaded or fine-tuned in place. The fingerprint hashes
content instead:

* a single file (e.g. GGUF): ``sha256:<sha256 of the bytes>`` (same value
  as ``sha256sum``);
* a Hugging Face folder: sha256 over a canonical JSON document holding the
  sha256 of ``config.json`` and, for every weight file (and weight index),
  its relative name, size and sha256. Tokenizer files are excluded: they do
  not change the compiled graph.

Hashing gigabytes on every start is slow, so per-file hashes are memoised
in a small JSON file keyed on (real path, size, mtime_ns, ctime_ns, inode,
device). ctime cannot be set from user space, so ``cp -p`` / ``rsync -t``
style rewrites that preserve mtime still invalidate the memo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .fsutil import sha256_file, write_json_atomic
from .key import canonical_json
from .paths import FINGERPRINT_MEMO_NAME, resolve_cache_dir

log = logging.getLogger("llmcore.compile_cache")

FINGERPRINT_SCHEME = "llmcore-model-fp-v1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".npy")
INDEX_SUFFIX = ".index.json"
MEMO_MAX_ENTRIES = 4096

_DEFAULT = object()


def _is_weight_file(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIX)


def _weight_files(folder: Path) -> List[str]:
    """Weight files under ``folder``, skipping hidden dirs (e.g. huggingface_hub's .cache/)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if not name.startswith(".") and _is_weight_file(rel):
                out.append(rel)
    return sorted(out)


class _Memo:
    """Best-effort memo of file hashes; any problem just means re-hashing."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.data: Dict[str, Dict[str, Any]] = {}
        self.dirty = False
        if path is not None:
            try:
                loaded = json.loads(path.read_text("utf-8"))
                if isinstance(loaded, dict) and loaded.get("scheme") == FINGERPRINT_SCHEME:
                    self.data = dict(loaded.get("files") or {})
            except (OSError, ValueError):
                pass

    @staticmethod
    def _stamp(st: os.stat_result) -> List[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def sha256(self, path: Path) -> Dict[str, Any]:
        real = os.path.realpath(path)
        st = os.stat(real)
        rec = self.data.get(real)
        if rec and rec.get("stamp") == self._stamp(st) and isinstance(rec.get("sha256"), str):
            rec["seen"] = time.time()
            return {"size": st.st_size, "sha256": rec["sha256"]}
        sha, size = sha256_file(Path(real))
        st_after = os.stat(real)
        if self._stamp(st_after) == self._stamp(st) and size == st.st_size:
            self.data[real] = {"stamp": self._stamp(st), "sha256": sha, "seen": time.time()}
            self.dirty = True
        return {"size": size, "sha256": sha}

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        items = sorted(self.data.items(), key=lambda kv: kv[1].get("seen", 0), reverse=True)[:MEMO_MAX_ENTRIES]
        try:
            write_json_atomic(self.path, {"scheme": FINGERPRINT_SCHEME, "files": dict(items)})
        except OSError as exc:
            log.debug("could not save fingerprint memo %s: %s", self.path, exc)


def fingerprint_model(path: Union[str, "os.PathLike[str]"], *,
                      memo_file: Union[None, str, "os.PathLike[str]", object] = _DEFAULT) -> str:
    """Return ``"sha256:<hex>"`` identifying the model at ``path`` by content.

    ``memo_file``: where to memoise per-file hashes; default
    ``<cache dir>/.fingerprints.json``; ``None`` disables memoisation.
    """
    p = Path(path).expanduser()
    if memo_file is _DEFAULT:
        memo_path: Optional[Path] = resolve_cache_dir() / FINGERPRINT_MEMO_NAME
    else:
        memo_path = Path(memo_file) if memo_file is not None else None  # type: ignore[arg-type]
    memo = _Memo(memo_path)
    try:
        if p.is_file():
            return "sha256:" + memo.sha256(p)["sha256"]
        if not p.is_dir():
            raise FileNotFoundError(f"cannot fingerprint {p}: no such file or directory")
        config = p / "config.json"
        weights = _weight_files(p)
        if not config.is_file() and not weights:
            raise ValueError(f"cannot fingerprint {p}: no config.json and no weight files "
                             f"({', '.join(WEIGHT_SUFFIXES)}) found")
        doc: Dict[str, Any] = {
            "scheme": FINGERPRINT_SCHEME,
            "config_json_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "files": [],
        }
        for rel in weights:
            rec = memo.sha256(p / rel)
            doc["files"].append([rel, rec["size"], rec["sha256"]])
        return "sha256:" + hashlib.sha256(canonical_json(doc).encode("ascii")).hexdigest()
    finally:
        memo.save()
