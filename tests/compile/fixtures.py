"""A tiny model compiled once per test session through the real `llmcore compile` (CPU, AOTInductor).

Shapes are kept small so the session pays for four ~10-20 s graph compiles
once: 2 slots with decode buckets [1, 2], max_seq_len 64 with prefill buckets
[16, 64]. Every test that serves it reuses that entry; ``tests/static`` imports
the same fixture, and its second call is a cache hit.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_SHAPES = ["--device", "cpu", "--batch-size", "2", "--max-seq-len", "64", "--seq-buckets", "16",
               "--dtype", "float32"]


@dataclass
class CompiledTiny:
    model: Path
    cache_dir: Path
    key: str
    path: Path
    code: int
    out: str  # stdout of the call that produced the entry (the first one compiles)
    err: str

    def args(self, *extra: str) -> list[str]:
        return [*TINY_SHAPES, "--model", str(self.model), "--cache-dir", str(self.cache_dir), *extra]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`llmcore compile ARGS` in-process; returns (exit status, stdout, stderr)."""
    from llmcore.compiled.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def compiled_tiny(tiny_llama, tmp_path_factory) -> CompiledTiny:
    cache_dir = tmp_path_factory.getbasetemp() / "compiled-tiny-cache"
    base = CompiledTiny(tiny_llama, cache_dir, "", Path(), 0, "", "")
    code, out, err = run_cli(base.args())
    assert code == 0, err
    key = re.search(r"^cache key\s+([0-9a-f]{64})$", out, re.M).group(1)
    path = cache_dir / key[:16]
    return CompiledTiny(tiny_llama, cache_dir, key, path, code, out, err)


@pytest.fixture(scope="module")
def isolated_cache_env(compiled_tiny):
    """LLMCORE_CACHE_DIR -> the session's cache, so keys resolve and nothing lands in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMCORE_CACHE_DIR", str(compiled_tiny.cache_dir))
        mp.delenv("LLMCORE_SHARED_CACHE_DIR", raising=False)
        yield compiled_tiny.cache_dir
