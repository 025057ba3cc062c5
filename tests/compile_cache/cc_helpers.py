"""Shared helpers for compile_cache tests (a uniquely named module, so that
``import`` cannot pick up another directory's conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

from compile_cache import CacheKey

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "cc_worker.py"

BASE_KEY = dict(
    model_fingerprint="sha256:" + "ab" * 32,
    plugin="cpu",
    plugin_version="0.1.0",
    compiler="torch-inductor",
    compiler_version="2.13.0",
    compiler_flags={"mode": "max-autotune", "freezing": True},
    dtype="bfloat16",
    quantization=None,
    static_shapes={"batch_sizes": [1, 4], "max_seq_len": 2048, "block_size": 16},
    tensor_parallel=1,
    extra={},
    target=None,
)


def make_key(**overrides) -> CacheKey:
    kw = dict(BASE_KEY)
    kw.update(overrides)
    return CacheKey(**kw)


def write_artifacts(tmp: Path, payload: bytes = b"compiled-graph-bytes" * 100) -> dict:
    """A stand-in build_fn body: two files, one in a subdirectory."""
    (tmp / "model.pt2").write_bytes(payload)
    (tmp / "kernels").mkdir()
    (tmp / "kernels" / "k0.so").write_bytes(b"\x7fELF" + payload[:64])
    return {"model": "tiny-llama", "compiler_log_lines": 3}


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
