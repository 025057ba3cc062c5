"""Serving a compiled artifact: ``Engine(compiled=KEY or path)``.

The entry's plan decides the device, dtype, model, batch slots and maximum
sequence length. Settings the user passed explicitly are compared with it
(:func:`llmcore.compiled.plan.reconcile`); a difference is an error that names
both values and the ``llmcore compile`` command that would build what was
asked for. Nothing is silently changed. Settings left at their defaults take
the artifact's values, so the scheduler then runs at most ``slots`` sequences,
never past ``max_seq_len``, and the runner pads each step to the smallest
compiled bucket.

The entry is also checked against the machine serving it: the cache key is
rebuilt here (model fingerprint, plugin version, compiler version and flags,
hardware target) and compared field by field with the entry's, so an artifact
built by another torch or for another CPU ISA is refused with the field that
differs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compile_cache import CacheEntry, CacheError, CompileCache, CorruptEntryError, IncompatibleEntryError

from llmcore.compiled.adopt import adopt, is_vendor_directory
from llmcore.compiled.build import CompileRequest
from llmcore.compiled.keys import build_key, key_differences
from llmcore.compiled.plan import StaticPlan, reconcile
from llmcore.config import EngineConfig, normalize_dtype
from llmcore.errors import ConfigError, ModelLoadError, RequestError
from llmcore.models.loader import resolve_model
from llmcore.sampling_params import SamplingParams

log = logging.getLogger("llmcore.compiled.serve")

#: EngineConfig option -> (StaticPlan field, CompileRequest field)
PLAN_OPTIONS = {
    "device": ("device", "device"),
    "dtype": ("dtype", "dtype"),
    "quantization": ("quantization", "quantization"),
    "max_num_seqs": ("batch_size", "batch_size"),
    "max_model_len": ("max_seq_len", "max_seq_len"),
    "block_size": ("block_size", "block_size"),
    "tensor_parallel_size": ("tensor_parallel", "tensor_parallel"),
}
#: options that size a paged KV cache; a compiled plan fixes the cache instead
FIXED_BY_PLAN = ("num_kv_blocks", "kv_cache_memory")


def explicit_settings(model: Any, device: Any, dtype: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Engine arguments the user actually passed (defaults are not settings to check)."""
    out = dict(kwargs)
    out.pop("compiled", None)
    if model is not None:
        out["model"] = model
    if device is not None:
        out["device"] = device
    if dtype is not None and normalize_dtype(dtype) != "auto":
        out["dtype"] = dtype
    return out


@dataclass
class StaticServing:
    entry: CacheEntry
    plan: StaticPlan
    request: Any  # CompileRequest the entry was built from
    model_path: Path
    model_fingerprint: str

    @property
    def recompile_command(self) -> str:
        return self.request.command()

    def command(self, **changes: Any) -> str:
        return self.request.command(**changes)

    # ----------------------------------------------------------------- runner

    def check_environment(self, device: Any, plugin: str, probe: Any) -> None:
        """Refuse an entry whose key differs from the one this machine would compute."""
        want = build_key(self.model_fingerprint, plugin, probe.plugin_version,
                         device.compile_key_inputs(self.plan), self.plan)
        diffs = key_differences(self.entry.key, want)
        if diffs:
            raise ConfigError(
                "compiled", self.entry.short,
                "was compiled for another environment (" + "; ".join(diffs) + ")",
                f"Recompile it here: {self.recompile_command}",
            )

    def create_runner(self, device: Any, report: Any, model_config: Any, eos_token_ids: list[int]) -> Any:
        self.check_environment(device, report.plugin, report.probe)
        return device.create_static_runner(self.entry.path, self.plan, model_config, self.model_path,
                                           list(eos_token_ids))

    # --------------------------------------------------------------- requests

    def check_request(self, num_prompt_tokens: int, params: SamplingParams, model_max_len: int) -> None:
        """Refuse a request the compiled shapes cannot serve, naming the limit and the fix."""
        plan = self.plan
        if num_prompt_tokens >= plan.max_seq_len:
            want = min(_pow2(num_prompt_tokens + max(params.max_tokens or 1, 1)), model_max_len)
            fix = f"Shorten the prompt to at most {plan.max_seq_len - 1} tokens"
            if want > plan.max_seq_len:
                fix += f", or recompile: {self.command(max_seq_len=want)}"
            raise RequestError(
                "prompt", f"<{num_prompt_tokens} tokens>",
                f"is {num_prompt_tokens} tokens; compiled artifact {self.entry.short} has max_seq_len="
                f"{plan.max_seq_len}, which leaves no room to generate", fix,
            )
        if params.n > plan.batch_size:
            raise RequestError(
                "n", params.n, f"needs {params.n} sequences at once but compiled artifact "
                f"{self.entry.short} has {plan.batch_size} batch slots",
                f"Use n <= {plan.batch_size}, or recompile: {self.command(batch_size=params.n)}",
            )
        if params.prompt_logprobs is not None:
            raise RequestError(
                "prompt_logprobs", params.prompt_logprobs,
                "is not available from a compiled artifact (its prefill graphs return the last "
                "position's logits only)", "Serve without compiled= to get prompt logprobs",
            )


def prepare_static(cfg: EngineConfig, explicit: dict[str, Any], cache: CompileCache | None = None) -> StaticServing:
    """Resolve ``cfg.compiled``, reconcile it with ``explicit`` and fill ``cfg`` from the plan.

    After this, ``cfg`` holds the artifact's device, dtype, model, slots
    (``max_num_seqs``), ``max_model_len`` and a KV budget of exactly
    ``slots x max_seq_len`` tokens, with prefix caching off (slots are private; an explicit
    ``enable_prefix_caching=True`` is logged, not refused, as every front end passes it).
    """
    ref = cfg.compiled
    cache = cache or CompileCache()
    if is_vendor_directory(ref):  # saved by optimum-rbln / optimum-neuron: adopt it into the cache first
        ref = adopt(ref, device=explicit.get("device"), model=explicit.get("model"), explicit=explicit,
                    cache=cache).entry.digest
    entry = _resolve(cache, ref)
    meta = entry.metadata
    if "plan" not in meta or "compile_args" not in meta:
        raise ConfigError("compiled", ref, f"entry {entry.short} was not made by `llmcore compile` (no plan in "
                          "its metadata)", "Compile with: llmcore compile --device ... --batch-size ... "
                          "--max-seq-len ...")
    plan = StaticPlan.from_dict(meta["plan"])
    request = CompileRequest.from_dict(meta["compile_args"])

    requested: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    names = {plan_field: option for option, (plan_field, _) in PLAN_OPTIONS.items()}
    for option, (plan_field, request_field) in PLAN_OPTIONS.items():
        if option in explicit and explicit[option] is not None:
            value = explicit[option]
            if option == "dtype":
                value = normalize_dtype(value)
            if option == "block_size" and plan.block_size is None:
                continue  # the device keeps no paged KV for this plan; block size is bookkeeping only
            requested[plan_field] = value
            changes[request_field] = value
    reconcile(plan, requested, request.command(**changes), names=names, artifact=entry.short)
    for option in FIXED_BY_PLAN:
        if explicit.get(option) is not None:
            raise ConfigError(option, explicit[option], f"is fixed by compiled artifact {entry.short} "
                              f"({plan.batch_size} slots x {plan.max_seq_len} tokens)",
                              f"Drop it, or recompile with other shapes: {request.command()}")
    if explicit.get("enable_prefix_caching"):
        # on by default in every front end, so not treated as a conflicting setting
        log.info("prefix caching is off when serving a compiled artifact: each sequence owns a slot")

    model_path, fingerprint = _model_for(cache, entry, request, explicit.get("model"))

    cfg.model = str(model_path)
    cfg.device = plan.device
    cfg.extra = {**(request.settings or {}), **(cfg.extra or {})}  # the device settings it was built with
    cfg.dtype = plan.dtype
    cfg.quantization = plan.quantization
    cfg.max_num_seqs = plan.batch_size
    cfg.max_model_len = plan.max_seq_len
    if plan.block_size:
        cfg.block_size = plan.block_size
    elif cfg.block_size is None:
        cfg.block_size = 16  # slots are whole sequences; the block size only counts tokens
    cfg.num_kv_blocks = plan.batch_size * -(-plan.max_seq_len // cfg.block_size)
    cfg.enable_prefix_caching = False
    log.info("serving compiled artifact %s: %s, %d slots, max_seq_len %d, decode buckets %s, prefill "
             "buckets %s", entry.short, plan.device, plan.batch_size, plan.max_seq_len,
             list(plan.batch_buckets), list(plan.seq_buckets))
    return StaticServing(entry, plan, request, model_path, fingerprint)


def _resolve(cache: CompileCache, ref: str) -> CacheEntry:
    try:
        return cache.resolve(ref)
    except (CorruptEntryError, IncompatibleEntryError) as exc:
        cmd = _command_from_damaged(exc)
        raise ConfigError(
            "compiled", ref, f"cache entry is unusable: {exc}",
            f"Rebuild it: {cmd}" if cmd else "Rebuild it with the llmcore compile command that made it",
        ) from None
    except CacheError as exc:
        raise ConfigError("compiled", ref, str(exc),
                          "Or compile first: llmcore compile --device DEVICE --batch-size B --max-seq-len S") from None


def _command_from_damaged(exc: Exception) -> str | None:
    """The recompile command from a damaged entry's manifest, if it is still readable."""
    path = getattr(exc, "path", None) or getattr(exc, "entry", None)
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        return str(manifest["metadata"]["recompile_command"])
    except Exception:
        return None


def _model_for(cache: CompileCache, entry: CacheEntry, request: Any, explicit_model: Any) -> tuple[Path, str]:
    want = entry.key.model_fingerprint
    spec = explicit_model if explicit_model is not None else request.model
    try:
        path = resolve_model(spec)
    except ModelLoadError as exc:
        if explicit_model is not None:
            raise
        raise ConfigError(
            "compiled", entry.short, f"was compiled from model {spec or 'SmolLM2-135M-Instruct (default)'}, "
            f"which cannot be loaded here ({exc})", "Pass model= with the same weights",
        ) from None
    have = cache.fingerprint_model(path)
    if have != want:
        where = f"model={explicit_model!r}" if explicit_model is not None else f"its model {path}"
        raise ConfigError(
            "model", str(explicit_model if explicit_model is not None else spec),
            f"has other weights than compiled artifact {entry.short} was built from ({where}: fingerprint "
            f"{have[:23]}, artifact: {want[:23]})",
            f"Serve it with the original weights, or compile this model: {request.command(model=str(path))}",
        )
    return path, have


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
