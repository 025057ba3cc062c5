"""Ahead-of-time compile for static shapes: ``llmcore compile`` and its Python API.

    from llmcore.compile import CompileRequest, compile_model
    outcome = compile_model(CompileRequest(device="cpu", batch_size=4, max_seq_len=256))
    Engine(compiled=outcome.entry.digest)

The CLI is :mod:`llmcore.compile.cli` (``add_compile_parser`` for the main CLI);
serving an entry is :mod:`llmcore.engine.static`. See docs/compile.md.
"""

from __future__ import annotations

from typing import Any

from llmcore.compile.build import (CompileOutcome, CompileRequest, PlannedCompile, entry_metadata,
                                   plan_compile, run_compile)
from llmcore.compile.keys import build_key, key_differences, static_shapes

__all__ = [
    "CompileOutcome", "CompileRequest", "PlannedCompile", "build_key", "compile_model", "entry_metadata",
    "key_differences", "plan_compile", "run_compile", "static_shapes",
]


def compile_model(request: CompileRequest, cache: Any = None, *, say=None, show_progress: bool = True,
                  registry: Any = None) -> CompileOutcome:
    """Plan, then compile ``request`` into ``cache`` (default: ``CompileCache()``); a hit returns at once."""
    from compile_cache import CompileCache

    cache = cache if cache is not None else CompileCache()
    return run_compile(plan_compile(request, cache, registry), cache, say=say, show_progress=show_progress)
