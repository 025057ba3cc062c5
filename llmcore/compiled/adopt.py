"""Adopting a directory compiled by a vendor's own tools: ``llmcore cache import DIR`` and
``Engine(compiled=DIR)``.

Users of vllm-rbln, TGI-neuron or the SDK tutorials already hold directories written by
optimum-rbln's or optimum-neuron's ``save_pretrained``. Their settings are read from the SDK's
own config file (``rbln_config.json``, ``neuron_config.json``) by the device plugin
(``Device.plan_from_artifact``), turned into the :class:`StaticPlan` they were compiled for,
reconciled with any setting the user passes (a difference names both values) and stored in the
compile cache like an entry ``llmcore compile`` made, so serving finds, verifies and keys it the
same way. ``check=True`` stops after the reconciliation and copies nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compile_cache import CacheEntry, CompileCache

from llmcore.compiled.build import CompileRequest
from llmcore.compiled.keys import build_key
from llmcore.compiled.plan import StaticPlan, reconcile
from llmcore.config import EngineConfig, normalize_dtype
from llmcore.errors import ConfigError
from llmcore.models.config import ModelConfig
from llmcore.models.loader import resolve_model
from llmcore.plugins import get_registry
from llmcore.selection import probe_all
from llmcore.version import __version__ as LLMCORE_VERSION

#: option a user passes -> StaticPlan field it is checked against
CHECKED = {"max_num_seqs": "batch_size", "max_model_len": "max_seq_len",
           "tensor_parallel_size": "tensor_parallel", "dtype": "dtype", "block_size": "block_size"}


@dataclass
class Adopted:
    device: str
    plan: StaticPlan
    request: CompileRequest
    entry: CacheEntry | None  # None with check=True


def vendor_device(directory: Path, device: str | None, registry: Any) -> Any:
    """The device whose SDK wrote ``directory`` (its config file is there), checked against ``device``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError("compiled", str(directory), "is not a directory", "Pass the folder save_pretrained wrote")
    found = []
    for report in probe_all(registry, {"device": device} if device else {}):
        dev = registry.hook.llmcore_create_device(name=report.probe.name, config=EngineConfig(device=report.probe.name))
        name = getattr(dev, "artifact_config_file", None)
        if name and (directory / name).is_file():
            found.append((report, dev, name))
    if device is not None:
        mine = [f for f in found if f[0].probe.name == device]
        if not mine:
            others = ", ".join(f"{r.probe.name} ({n})" for r, _, n in found) or "none"
            raise ConfigError("device", device, f"did not write {directory} (config files of: {others})",
                              "Drop --device, or pass the directory the device's SDK saved")
        return mine[0]
    if not found:
        raise ConfigError("compiled", str(directory), "holds no rbln_config.json or neuron_config.json",
                          "Pass a directory saved by optimum-rbln or optimum-neuron save_pretrained")
    return found[0]


def adopt(directory: str | Path, *, device: str | None = None, model: str | None = None,
          explicit: dict[str, Any] | None = None, check: bool = False, cache: CompileCache | None = None,
          registry: Any = None) -> Adopted:
    """Read, reconcile and (unless ``check``) store a vendor-compiled directory in the cache.

    ``model`` is the Hugging Face folder the tokenizer (and, for the stand-ins, the weights) come
    from; default: the directory itself. ``explicit`` holds serving options the user set
    (``max_num_seqs``, ``max_model_len``, ``tensor_parallel_size``, ``dtype``, ``block_size``).
    """
    directory = Path(directory).expanduser().resolve()
    registry = registry or get_registry()
    cache = cache if cache is not None else CompileCache()
    report, dev, config_file = vendor_device(directory, device, registry)
    model_config = ModelConfig.from_path(directory)
    plan, settings = dev.plan_from_artifact(directory, model_config)
    if settings:  # the device settings the directory was built with (target, NPU, ...) key it
        dev = registry.hook.llmcore_create_device(
            name=plan.device, config=EngineConfig(device=plan.device, extra=dict(settings)))
    model_path = resolve_model(model) if model else directory
    request = CompileRequest(device=plan.device, batch_size=plan.batch_size, max_seq_len=plan.max_seq_len,
                             model=str(model_path), dtype=plan.dtype, quantization=plan.quantization,
                             tensor_parallel=plan.tensor_parallel, block_size=plan.block_size,
                             buckets=tuple(plan.batch_buckets) if len(plan.batch_buckets) > 1 else None,
                             settings=dict(settings))
    requested = {CHECKED[k]: (normalize_dtype(v) if k == "dtype" else v)
                 for k, v in (explicit or {}).items() if k in CHECKED and v is not None}
    reconcile(plan, requested, f"llmcore cache import {directory} with the SDK settings you want "
              f"(recompile with optimum-{plan.device} or: {request.command()})",
              names={v: k for k, v in CHECKED.items()}, artifact=f"{directory}/{config_file}")
    if check:
        return Adopted(plan.device, plan, request, None)
    key = build_key(cache.fingerprint_model(model_path), report.plugin, report.probe.plugin_version,
                    dev.compile_key_inputs(plan), plan)
    metadata = {
        "plan": plan.to_dict(), "compile_args": request.to_dict(), "recompile_command": request.command(),
        "model": str(model_path), "model_path": str(model_path), "model_architecture": model_config.architecture,
        "llmcore_version": LLMCORE_VERSION, "adopted_from": str(directory),
    }

    def copy(tmp: Path) -> dict[str, Any]:
        shutil.copytree(directory, tmp, dirs_exist_ok=True)
        return {"device_metadata": {config_file: str(directory / config_file)}}

    entry = cache.get_or_build(key, copy, metadata=metadata)
    return Adopted(plan.device, plan, request, entry)


def is_vendor_directory(ref: Any) -> bool:
    """A model directory that is not a cache entry: a device plugin may recognise its config file."""
    p = Path(str(ref)).expanduser()
    return p.is_dir() and not (p / "manifest.json").exists() and (p / "config.json").is_file()
