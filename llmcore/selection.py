"""Probing every plugin and choosing a device, with reasons a user can read."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmcore.capabilities import DeviceProbe
from llmcore.errors import ConfigError, DeviceUnavailableError, PluginError
from llmcore.plugins import PluginRegistry, require_known
from llmcore.quantization import explain_refusal

log = logging.getLogger("llmcore.selection")


@dataclass
class ProbeReport:
    plugin: str
    probe: DeviceProbe


def probe_all(registry: PluginRegistry, config: dict[str, Any] | None = None) -> list[ProbeReport]:
    """Ask every plugin; a plugin that raises is reported as score 0, never fatal."""
    reports: list[ProbeReport] = []
    for name, plugin in registry.pm.list_name_plugin():
        impl = getattr(plugin, "llmcore_probe", None)
        if impl is None:
            continue
        try:
            answer = impl(config=dict(config or {}))
        except Exception as exc:  # one broken plugin must not stop the start
            log.error("probe of plugin %r raised: %s", name, exc)
            answer = DeviceProbe(name=name, score=0, reason=f"probe raised {type(exc).__name__}: {exc}")
        answers = answer if isinstance(answer, list) else [answer]
        for a in answers:
            if a is None:
                continue
            if not isinstance(a, DeviceProbe):
                a = DeviceProbe(name=name, score=0, reason=f"probe returned {type(a).__name__}, not DeviceProbe")
            reports.append(ProbeReport(plugin=name, probe=a))
    return reports



def select_device(registry: PluginRegistry, reports: list[ProbeReport], requested: str | None) -> ProbeReport:
    """``requested`` wins; otherwise the highest score (ties: alphabetical, logged)."""
    if requested:
        for r in reports:
            if r.probe.name == requested:
                if not r.probe.usable:
                    msg = f"device {requested!r} cannot run here: {r.probe.reason}"
                    if r.probe.hint:
                        msg += f". {r.probe.hint}"
                    raise DeviceUnavailableError(msg + f". Usable devices: {_usable(reports)}")
                return r
        require_known(registry, requested)
        known = sorted({r.probe.name for r in reports})
        raise ConfigError(
            "device", requested, "is not a known device",
            f"Known devices: {', '.join(known) or 'none'} (usable here: {_usable(reports)}); "
            "run 'llmcore devices' for details",
        )
    usable = [r for r in reports if r.probe.usable]
    if not usable:
        raise PluginError(
            "no usable device: " + "; ".join(f"{r.probe.name}: {r.probe.reason}" for r in reports)
        )
    usable.sort(key=lambda r: (-r.probe.score, r.probe.name))
    best = usable[0]
    ties = [r.probe.name for r in usable[1:] if r.probe.score == best.probe.score]
    if ties:
        log.info("devices %s tie with %s (score %d); chose %s by name", ties, best.probe.name,
                 best.probe.score, best.probe.name)
    return best


def _usable(reports: list[ProbeReport]) -> str:
    names = [r.probe.name for r in reports if r.probe.usable]
    return ", ".join(names) or "none"


def validate_against(config, probe: DeviceProbe, reports: list[ProbeReport]) -> str:
    """Check dtype and quantization against the device's capabilities; return the dtype.

    Runs before any weight is loaded.
    """
    caps = probe.capabilities
    dtype = caps.default_dtype if config.dtype == "auto" else config.dtype
    if dtype not in caps.dtypes:
        raise ConfigError(
            "dtype", config.dtype, f"is not supported on {probe.name}",
            f"Available on {probe.name}: {', '.join(caps.dtypes)}",
        )
    q = config.quantization
    if q is not None and q not in caps.quantization:
        # the registry (llmcore.quantization) says where the method runs and why not here
        others = {r.probe.name: tuple(r.probe.capabilities.quantization) for r in reports}
        problem, hint = explain_refusal(q, probe.name, tuple(caps.quantization), others)
        raise ConfigError("quantization", q, problem, hint)
    return dtype
