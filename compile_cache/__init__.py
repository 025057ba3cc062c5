"""compile_cache: a content-addressed, verified store of compiled model artifacts.

Ahead-of-time compiled LLM graphs (torch AOTInductor packages, Neuron and
RBLN compiler output) are expensive to build and dangerous to reuse wrongly.
This package keys them on everything they depend on (``CacheKey``), builds
each key once even across processes, publishes entries atomically, and
verifies every file's sha256 before handing an entry out. Standard library
only (no torch, no pickle); see README.md in this directory.

    from compile_cache import CacheKey, CompileCache, fingerprint_model

    key = CacheKey(model_fingerprint=fingerprint_model(model_dir), plugin="cpu",
                   plugin_version="0.1.0", compiler="torch-inductor",
                   compiler_version=torch.__version__, dtype="bfloat16")
    entry = CompileCache().get_or_build(key, lambda tmp: compile_into(tmp))
    model = load(entry.file("model.pt2"))
"""

from __future__ import annotations

__version__ = "0.1.0"

from .entry import CacheEntry
from .errors import CacheError, CorruptEntryError, IncompatibleEntryError
from .fingerprint import fingerprint_model
from .key import CacheKey
from .lock import KeyLock, LockTimeout
from .manifest import FORMAT_VERSION
from .paths import (ENV_CACHE_DIR, ENV_SHARED_CACHE_DIR, default_cache_dir, resolve_cache_dir,
                    resolve_shared_dir)
from .store import CompileCache, LsRow, VerifyRow

__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheKey",
    "CompileCache",
    "CorruptEntryError",
    "ENV_CACHE_DIR",
    "ENV_SHARED_CACHE_DIR",
    "FORMAT_VERSION",
    "IncompatibleEntryError",
    "KeyLock",
    "LockTimeout",
    "LsRow",
    "VerifyRow",
    "default_cache_dir",
    "fingerprint_model",
    "resolve_cache_dir",
    "resolve_shared_dir",
    "__version__",
]
