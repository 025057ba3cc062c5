"""The quantization registry: which methods exist, on which devices they run, how they load.

A :class:`~llmcore.capabilities.QuantMethod` is data (importing this module never imports torch). The
core's own methods are listed in :mod:`llmcore.quantization.builtin`; plugins add
theirs through the ``llmcore_quantization_methods`` hook. A device's probe lists
the methods it offers *now* (declared for the device and with their
requirements importable) in ``Capabilities.quantization``, computed from this
registry, so ``Engine(quantization=...)``, ``--quantization`` and
``llmcore devices`` read one matrix.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from llmcore.capabilities import QuantMethod
from llmcore.errors import ConfigError
from llmcore.plugins import get_registry
from llmcore.quantization import builtin

log = logging.getLogger("llmcore.quantization")


def builtin_methods() -> list[QuantMethod]:
    return list(builtin.BUILTIN_METHODS)  # read through the module: tests and plugins may replace it


def methods(plugins: Any = None) -> list[QuantMethod]:
    """Every known method: the core's, then each plugin's (a clashing name keeps the first)."""
    found = builtin_methods()
    names = {m.name for m in found}
    if plugins is None:
        plugins = get_registry()
    for answer in plugins.hook.llmcore_quantization_methods():
        for m in answer or ():
            if not isinstance(m, QuantMethod):
                log.error("a plugin returned %r from llmcore_quantization_methods, not QuantMethod", m)
            elif m.name in names:
                log.error("quantization method %r is defined twice; keeping the first", m.name)
            else:
                names.add(m.name)
                found.append(m)
    return found


def get(name: str, plugins: Any = None) -> QuantMethod:
    """The method called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    known = methods(plugins)
    for m in known:
        if m.name == name:
            return m
    raise ConfigError(
        "quantization", name, "is not a known quantization method",
        f"Known methods: {', '.join(m.name for m in known)} (see 'llmcore devices')",
    )


def methods_for_device(device: str, plugins: Any = None, available_only: bool = False) -> list[QuantMethod]:
    """Methods implemented for ``device`` (only those installed here if ``available_only``)."""
    return [
        m for m in methods(plugins)
        if device in m.devices and (not available_only or not m.missing(device))
    ]


def available_names(device: str) -> tuple[str, ...]:
    """Names of the core methods ``device`` can run here; what a device's probe lists.

    Built-ins only, find_spec checks only: safe to call from a probe.
    """
    return tuple(m.name for m in builtin_methods() if m.available_on(device))


def matrix(plugins: Any = None, devices: tuple[str, ...] | None = None) -> dict[str, dict[str, str]]:
    """``{method: {device: cell}}`` where a cell is ``"yes"``, ``"needs X"`` or ``"-"``."""
    all_methods = methods(plugins)
    if devices is None:
        seen: list[str] = []
        for m in all_methods:
            seen += [d for d in m.devices if d not in seen]
        devices = tuple(seen)
    out: dict[str, dict[str, str]] = {}
    for m in all_methods:
        row = {}
        for d in devices:
            if d not in m.devices:
                row[d] = "-"
            else:
                needed = (*m.requires, *m.requires_on.get(d, ()))
                row[d] = "yes" + (f" (needs {', '.join(needed)})" if needed else "")
        out[m.name] = row
    return out


def explain_refusal(name: str, device: str, offered: tuple[str, ...],
                    others: Mapping[str, tuple[str, ...]], plugins: Any = None) -> tuple[str, str]:
    """``(problem, hint)`` for a ConfigError refusing method ``name`` on ``device``.

    :param offered: the methods ``device`` offers here (its probe's capabilities).
    :param others: every probed device's offer, ``{device: methods}``.
    """
    try:
        registered = methods(plugins)
    except Exception as exc:  # a broken third-party method list must not hide the refusal
        log.error("quantization registry failed: %s", exc)
        registered = builtin_methods()
    method = next((m for m in registered if m.name == name), None)
    where = [d for d, qs in others.items() if name in qs]
    if method is not None:
        where = [*method.devices, *(d for d in where if d not in method.devices)]
    if method is None and not where:
        known = sorted({m.name for m in registered} | {q for qs in others.values() for q in qs})
        return "is not a known quantization method", f"Known methods: {', '.join(known)}"
    parts = [f"Available on {device}: {', '.join(offered) or 'none'}"]
    if method is not None and device in method.devices:
        missing = method.missing(device)
        if missing:
            parts.append(f"{name} needs {', '.join(missing)} on {device}"
                         + (f": {method.install_hint}" if method.install_hint else ""))
        else:
            parts.append(f"the {device} plugin does not offer {name} yet")
    parts.append(f"{name} runs on: {', '.join(where)}")
    listed = [f"{d}: {', '.join(qs)}" for d, qs in others.items() if qs and d != device]
    if listed:
        parts.append("Devices found here offer " + "; ".join(listed))
    return f"is not available on {device}", ". ".join(parts)
