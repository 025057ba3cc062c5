"""Ahead-of-time compile: request -> plan -> cache key -> artifact in the compile cache.

Two steps so a plan (and its key) can be shown without compiling
(``--dry-run``), and so a device that cannot run here (Neuron on a laptop)
still gets its plan checked against its capabilities:

    planned = plan_compile(CompileRequest(device="cpu", batch_size=4, max_seq_len=256), cache)
    outcome = run_compile(planned, cache)      # a cache hit returns at once
    Engine(compiled=outcome.entry.digest)
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from compile_cache import CacheEntry, CacheKey, CompileCache

from llmcore.compiled.keys import build_key
from llmcore.compiled.plan import StaticPlan, plan_static
from llmcore.config import EngineConfig, normalize_dtype
from llmcore.errors import ConfigError, DeviceUnavailableError, PluginError
from llmcore.models.config import ModelConfig
from llmcore.models.loader import resolve_model
from llmcore.plugins import get_registry
from llmcore.selection import probe_all, select_device
from llmcore.version import __version__ as LLMCORE_VERSION


log = logging.getLogger("llmcore.compiled")

Say = Callable[[str], None]
#: CompileRequest.settings key -> its ``llmcore compile`` option
SETTING_FLAGS = {
    "neuron_target": "--neuron-target",
    "neuron_on_device_sampling": "--on-device-sampling",
    "rbln_npu": "--rbln-npu",
    "rbln_prefill_chunk_size": "--prefill-chunk-size",
}


@dataclass(slots=True)
class CompileRequest:
    """What the user asked ``llmcore compile`` for (``dtype`` may still be ``auto``)."""

    device: str
    batch_size: int
    max_seq_len: int
    model: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    tensor_parallel: int = 1
    buckets: tuple[int, ...] | None = None
    seq_buckets: tuple[int, ...] | None = None
    block_size: int | None = None
    #: device settings (``EngineConfig.extra``): neuron_target, rbln_npu, rbln_prefill_chunk_size,
    #: neuron_on_device_sampling; they change the compiled artifact, so they travel with the entry
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["buckets"] = list(self.buckets) if self.buckets else None
        d["seq_buckets"] = list(self.seq_buckets) if self.seq_buckets else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompileRequest":
        d = {k: v for k, v in d.items() if k in cls.__slots__}
        for name in ("buckets", "seq_buckets"):
            if d.get(name):
                d[name] = tuple(d[name])
        return cls(**d)

    def command(self, **changes: Any) -> str:
        """The ``llmcore compile`` command line for this request with ``changes`` applied.

        Buckets above a changed batch size / max length are dropped so the
        command stays valid.
        """
        r = replace(self, **changes)
        if r.buckets:
            r.buckets = tuple(b for b in r.buckets if b <= r.batch_size) or None
        if r.seq_buckets:
            r.seq_buckets = tuple(s for s in r.seq_buckets if s <= r.max_seq_len) or None
        parts = ["llmcore", "compile", "--device", r.device]
        if r.model:
            parts += ["--model", r.model]
        parts += ["--batch-size", str(r.batch_size), "--max-seq-len", str(r.max_seq_len)]
        if r.dtype and r.dtype != "auto":
            parts += ["--dtype", r.dtype]
        if r.quantization:
            parts += ["--quantization", r.quantization]
        if r.tensor_parallel != 1:
            parts += ["--tensor-parallel", str(r.tensor_parallel)]
        if r.buckets:
            parts += ["--buckets", ",".join(map(str, r.buckets))]
        if r.seq_buckets:
            parts += ["--seq-buckets", ",".join(map(str, r.seq_buckets))]
        if r.block_size:
            parts += ["--block-size", str(r.block_size)]
        for name, value in sorted((r.settings or {}).items()):
            flag = SETTING_FLAGS.get(name)
            if flag and value is True:
                parts.append(flag)
            elif flag and value not in (None, False):
                parts += [flag, str(value)]
        return shlex.join(parts)


@dataclass
class PlannedCompile:
    """A validated plan and, where the device could be created here, its cache key."""

    request: CompileRequest  # dtype resolved
    plugin: str
    probe: Any  # DeviceProbe
    plan: StaticPlan
    model_path: Path
    model_config: Any  # ModelConfig
    device: Any = None  # Device, when its plugin could create it here
    key: CacheKey | None = None
    key_problem: str = ""  # why there is no key

    @property
    def usable(self) -> bool:
        return self.probe.usable

    def unusable_message(self) -> str:
        msg = f"device {self.plan.device!r} cannot compile here: {self.probe.reason}"
        return msg + (f". {self.probe.hint}" if self.probe.hint else "")


@dataclass
class CompileOutcome:
    entry: CacheEntry
    hit: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


def plan_compile(request: CompileRequest, cache: CompileCache, registry: Any = None) -> PlannedCompile:
    """Resolve the model, plan against the device's capabilities and compute the key.

    Works for a device that is not usable here (the plan comes from the
    capabilities its probe reports); raises ConfigError for an invalid plan.
    """
    registry = registry or get_registry()
    reports = probe_all(registry, {"device": request.device})
    report = next((r for r in reports if r.probe.name == request.device), None)
    if report is None:
        select_device(registry, reports, request.device)  # raises: unknown device, with the known ones
        raise ConfigError("device", request.device, "is not a known device")
    caps = report.probe.capabilities
    for name, value in (request.settings or {}).items():
        owner = name.split("_")[0]
        if owner != request.device:
            raise ConfigError(SETTING_FLAGS.get(name, name), value, f"is a {owner} setting, not one for {request.device}",
                              f"Drop {SETTING_FLAGS.get(name, name)}")
    dtype = normalize_dtype(request.dtype)
    if dtype == "auto":
        dtype = caps.default_dtype
    model = request.model
    if model and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())  # the entry must name it from any directory
    request = replace(request, dtype=dtype, model=model)
    model_path = resolve_model(request.model)
    mc = ModelConfig.from_path(model_path)
    settings = dict(
        batch_size=request.batch_size, max_seq_len=request.max_seq_len, dtype=dtype,
        tensor_parallel=request.tensor_parallel, quantization=request.quantization,
        batch_buckets=request.buckets, seq_buckets=request.seq_buckets, block_size=request.block_size,
    )
    dev, problem = None, ""
    try:
        dev = registry.hook.llmcore_create_device(
            name=request.device, config=EngineConfig(device=request.device, dtype=dtype,
                                                     extra=dict(request.settings or {}))
        )
        if dev is None:
            problem = f"plugin {report.plugin!r} creates no {request.device!r} device here"
    except Exception as exc:  # an SDK-less plugin may refuse; the plan is still worth showing
        problem = f"plugin {report.plugin!r} could not create its device here ({exc})"
    # the device's own planner where there is one (its compiler may have further rules)
    planner = getattr(dev, "plan", None)
    plan = planner(mc, **settings) if planner else plan_static(mc, caps, request.device, **settings)
    planned = PlannedCompile(request, report.plugin, report.probe, plan, model_path, mc, device=dev,
                             key_problem=problem)
    if dev is None:
        return planned
    try:
        inputs = dev.compile_key_inputs(plan)
    except Exception as exc:
        planned.key_problem = f"{request.device!r} could not describe its compiler here ({exc})"
        return planned
    fingerprint = cache.fingerprint_model(model_path)
    planned.key = build_key(fingerprint, report.plugin, report.probe.plugin_version, inputs, plan)
    return planned


def entry_metadata(planned: PlannedCompile) -> dict[str, Any]:
    """What serving needs from an entry besides its files: the plan and how to rebuild it."""
    return {
        "plan": planned.plan.to_dict(),
        "compile_args": planned.request.to_dict(),
        "recompile_command": planned.request.command(),
        "model": planned.request.model,
        "model_path": str(planned.model_path),
        "model_architecture": planned.model_config.architecture,
        "llmcore_version": LLMCORE_VERSION,
    }


def run_compile(planned: PlannedCompile, cache: CompileCache, say: Say | None = None,
                show_progress: bool = True, lock_timeout: float | None = None) -> CompileOutcome:
    """Compile ``planned`` into the cache, or return the cached entry at once.

    A corrupt or partial entry is reported by the cache, removed, and rebuilt.
    """
    if not planned.usable:
        raise DeviceUnavailableError(planned.unusable_message())
    if planned.key is None:
        raise PluginError(f"cannot compile for {planned.plan.device!r}: {planned.key_problem}")
    say = say or (lambda msg: None)
    t0 = time.perf_counter()
    entry = cache.get(planned.key)
    if entry is not None:
        return CompileOutcome(entry, True, time.perf_counter() - t0)
    built: list[bool] = []

    def build(tmp: Path) -> dict[str, Any]:
        built.append(True)
        meta = planned.device.compile(planned.model_path, planned.model_config, planned.plan, tmp,
                                      progress=show_progress)
        return {"device_metadata": meta or {}}

    entry = cache.get_or_build(planned.key, build, metadata=entry_metadata(planned), progress=say,
                               lock_timeout=lock_timeout)
    return CompileOutcome(entry, not built, time.perf_counter() - t0)
