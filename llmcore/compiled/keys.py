"""The compile-cache key of a plan: one function, used when compiling and again when serving.

Everything that changes the artifact is in the key: the model's content
fingerprint, the plugin and its version, the compiler, its version and flags
(and the hardware target) as the device reports them for this plan, dtype,
quantization, every static shape and the tensor-parallel degree. Serving
rebuilds the key for the machine it runs on and compares it field by field
with the entry's, so an artifact from another torch, plugin or CPU ISA is
refused with the field that differs instead of crashing in a loader.
"""

from __future__ import annotations

from typing import Any

from compile_cache import CacheKey

from llmcore.compiled.plan import StaticPlan
from llmcore.version import __version__ as LLMCORE_VERSION


def static_shapes(plan: StaticPlan) -> dict[str, Any]:
    # "batch_sizes" is the name compile_cache's summaries (``cache ls``) show
    return {
        "batch_sizes": list(plan.batch_buckets),
        "batch_slots": plan.batch_size,
        "max_seq_len": plan.max_seq_len,
        "seq_buckets": list(plan.seq_buckets),
        "block_size": plan.block_size,
    }


def build_key(model_fingerprint: str, plugin: str, plugin_version: str, key_inputs: dict[str, Any],
              plan: StaticPlan) -> CacheKey:
    """``key_inputs`` is ``Device.compile_key_inputs(plan)``: compiler, compiler_version,
    compiler_flags and optionally ``target`` (hardware the code is built for) and ``extra``."""
    extra = {"device": plan.device, "llmcore": LLMCORE_VERSION}
    extra.update(key_inputs.get("extra") or {})
    return CacheKey(
        model_fingerprint=model_fingerprint,
        plugin=plugin,
        plugin_version=plugin_version or "unknown",
        compiler=str(key_inputs.get("compiler") or "none"),
        compiler_version=str(key_inputs.get("compiler_version") or "0"),
        compiler_flags=dict(key_inputs.get("compiler_flags") or {}),
        dtype=plan.dtype,
        quantization=plan.quantization,
        static_shapes=static_shapes(plan),
        tensor_parallel=plan.tensor_parallel,
        target=key_inputs.get("target"),
        extra=extra,
    )


def key_differences(have: CacheKey, want: CacheKey) -> list[str]:
    """Human-readable ``field: artifact X, here Y`` for every field that differs."""
    a, b = have.to_dict(), want.to_dict()
    out = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            if isinstance(a.get(name), dict) and isinstance(b.get(name), dict):
                for sub in sorted(set(a[name]) | set(b[name])):
                    if a[name].get(sub) != b[name].get(sub):
                        out.append(f"{name}.{sub}: artifact {a[name].get(sub)!r}, here {b[name].get(sub)!r}")
            else:
                out.append(f"{name}: artifact {a.get(name)!r}, here {b.get(name)!r}")
    return out
