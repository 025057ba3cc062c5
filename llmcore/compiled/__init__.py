"""Compiled (static-shape) serving, in one place: plan -> build -> key -> cache entry -> serve.

    from llmcore.compiled import CompileRequest, compile_model
    outcome = compile_model(CompileRequest(device="cpu", batch_size=4, max_seq_len=256))
    Engine(compiled=outcome.entry.digest)

The rooms, in the order a compiled model meets them:

* :mod:`.plan` — :class:`StaticPlan`: slots, buckets, lengths, memory, validated up front;
  ``reconcile`` refuses serving settings that differ from what was compiled.
* :mod:`.build` — ``llmcore compile``'s request -> plan -> compile into the cache.
* :mod:`.keys` — the compile-cache key of a plan, rebuilt when serving to refuse a foreign entry.
* :mod:`.cli` — the ``llmcore compile`` command (and ``llmcore cache import``).
* :mod:`.adopt` — adopting a directory compiled by a vendor's own ``save_pretrained``.
* :mod:`.serve` — ``Engine(compiled=...)``: the entry's plan fills the engine's settings.
* :mod:`.slots` — fixed batch slots and :class:`StaticSlotRunner`, which the neuron and rbln
  runners extend. See docs/compile.md.
"""

from __future__ import annotations

from typing import Any

from compile_cache import CompileCache

from llmcore.compiled.build import (CompileOutcome, CompileRequest, PlannedCompile, entry_metadata,
                                    plan_compile, run_compile)
from llmcore.compiled.keys import build_key, key_differences, static_shapes

__all__ = [
    "CompileOutcome", "CompileRequest", "PlannedCompile", "build_key", "compile_model", "entry_metadata",
    "key_differences", "plan_compile", "run_compile", "static_shapes",
]


def compile_model(request: CompileRequest, cache: Any = None, *, say=None, show_progress: bool = True,
                  registry: Any = None) -> CompileOutcome:
    """Plan, then compile ``request`` into ``cache`` (default: ``CompileCache()``); a hit returns at once."""
    cache = cache if cache is not None else CompileCache()
    return run_compile(plan_compile(request, cache, registry), cache, say=say, show_progress=show_progress)
