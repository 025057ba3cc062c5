"""Fixtures for compile_cache tests: an isolated cache root and a key factory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
# Works under any --import-mode: make the repo and cc_helpers importable.
for _p in (str(_HERE.parents[1]), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from cc_helpers import make_key  # noqa: E402
from compile_cache import CacheKey, CompileCache  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Never touch the real ~/.cache, and ignore any shared cache set in the environment."""
    monkeypatch.setenv("LLMCORE_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.delenv("LLMCORE_SHARED_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def key() -> CacheKey:
    return make_key()


@pytest.fixture
def cache(tmp_path) -> CompileCache:
    return CompileCache(root=tmp_path / "root")
