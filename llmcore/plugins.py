"""Finding, checking and registering plugins.

Built-in devices and third-party ones arrive the same way: an entry point in the
group ``llmcore.plugins`` naming a module. Each is checked on its own, so a
broken or outdated plugin is refused with a message and the rest still load
("several plugins installed" never crashes the start).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from llmcore import hookspecs
from llmcore.errors import PluginError

log = logging.getLogger("llmcore.plugins")

ENTRY_POINT_GROUP = "llmcore.plugins"
DISABLE_ENV = "LLMCORE_DISABLE_PLUGINS"


@dataclass
class RefusedPlugin:
    name: str
    source: str
    reason: str


@dataclass
class PluginRegistry:
    """The loaded plugins plus the ones refused, and why."""

    pm: pluggy.PluginManager
    sources: dict[str, str] = field(default_factory=dict)  # name -> "entry point x = y (dist z)"
    refused: list[RefusedPlugin] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def names(self) -> list[str]:
        return [n for n, _ in self.pm.list_name_plugin()]

    def register(self, plugin: Any, name: str, source: str = "in-process") -> bool:
        """Register one plugin after checking its contract version and hooks.

        Returns False (and records why) when the plugin is refused.
        """
        if name in self.disabled:
            return False
        reason = _contract_problem(plugin, name)
        if reason is None:
            try:
                self.pm.register(plugin, name=name)
            except ValueError as exc:  # duplicate name or same object twice
                reason = f"could not register: {exc}"
            except pluggy.PluginValidationError as exc:
                reason = f"invalid hook implementation: {exc}"
        if reason is None:
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                self.pm.unregister(name=name)
                reason = (
                    f"{exc}. Hook names must match a spec in llmcore/hookspecs.py "
                    f"({', '.join(_spec_names())})"
                )
        if reason is not None:
            log.error("plugin %r refused: %s", name, reason)
            self.refused.append(RefusedPlugin(name, source, reason))
            return False
        self.sources[name] = source
        return True


def _spec_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("llmcore_"))


def _contract_problem(plugin: Any, name: str) -> str | None:
    version = getattr(plugin, "LLMCORE_CONTRACT_VERSION", None)
    supported = ", ".join(str(v) for v in hookspecs.SUPPORTED_CONTRACT_VERSIONS)
    if version is None:
        return (
            f"plugin {name!r} does not declare LLMCORE_CONTRACT_VERSION; "
            f"this llmcore supports contract version {supported}. Add "
            f"'LLMCORE_CONTRACT_VERSION = {hookspecs.CONTRACT_VERSION}' to the plugin module"
        )
    if version not in hookspecs.SUPPORTED_CONTRACT_VERSIONS:
        return (
            f"plugin {name!r} was written for plugin contract version {version}, "
            f"but this llmcore supports contract version {supported}. Install a "
            f"release of the plugin built for contract {hookspecs.CONTRACT_VERSION}, "
            f"or an llmcore release that supports contract {version}"
        )
    return None


def disabled_from_env() -> list[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def load_plugins(
    disable: Iterable[str] = (),
    entry_points: Iterable[metadata.EntryPoint] | None = None,
    extra: Iterable[tuple[str, Any]] = (),
) -> PluginRegistry:
    """Build a registry from entry points (built-ins included) and ``extra``.

    :param disable: plugin names to skip, in addition to ``$LLMCORE_DISABLE_PLUGINS``.
    :param entry_points: override discovery (tests); default: the installed group.
    :param extra: ``(name, plugin)`` pairs registered in-process after entry points.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = PluginRegistry(pm=pm, disabled=[*disabled_from_env(), *disable])
    eps = list(entry_points) if entry_points is not None else _discover()
    seen: set[str] = set()
    for ep in sorted(eps, key=lambda e: e.name):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        source = f"entry point {ep.name} = {ep.value} (distribution {dist})"
        if ep.name in registry.disabled:
            log.info("plugin %r disabled by %s", ep.name, DISABLE_ENV)
            continue
        if ep.name in seen:
            registry.refused.append(
                RefusedPlugin(ep.name, source, f"another plugin named {ep.name!r} is already loaded")
            )
            continue
        seen.add(ep.name)
        try:
            plugin = ep.load()
        except Exception as exc:  # a plugin that cannot import never stops the start
            log.error("plugin %r failed to import: %s", ep.name, exc)
            registry.refused.append(
                RefusedPlugin(ep.name, source, f"import failed: {type(exc).__name__}: {exc}")
            )
            continue
        registry.register(plugin, ep.name, source)
    for name, plugin in extra:
        registry.register(plugin, name)
    return registry


def _discover() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


_DEFAULT: PluginRegistry | None = None


def get_registry(refresh: bool = False) -> PluginRegistry:
    """The process-wide registry, loaded on first use."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        _DEFAULT = load_plugins()
    return _DEFAULT


def require_known(registry: PluginRegistry, name: str) -> None:
    if name in registry.names():
        return
    for r in registry.refused:
        if r.name == name:
            raise PluginError(f"device plugin {name!r} was refused: {r.reason}")
    if name in registry.disabled:
        raise PluginError(
            f"device plugin {name!r} is disabled (via {DISABLE_ENV} or disable=); "
            f"enabled plugins: {', '.join(registry.names()) or 'none'}"
        )
