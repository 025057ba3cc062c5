"""The models a server runs now, by name and version; loaded and unloaded while it serves.

:class:`LiveModels` is what both protocols look models up in. A model of the repository is
served under ``name:version`` (its canonical name, used in metrics and in OpenAI responses) and
also answers to ``name`` alone (its highest loaded version). A model given on the command line
is version 1 and keeps its plain name. :attr:`LiveModels.by_name` is a live read-only mapping of
the canonical names, so the OpenAI routes see loads and unloads at once.

Loading builds the engine in a worker thread, so the other models keep serving; a failed load
leaves them alone and keeps the reason for the repository index. Unloading takes the model out
of the lookup at once (new requests get 404), then either *drains* (waits until the requests in
flight finish, at most the model's request timeout) or *aborts* them, stops its engine and frees
its KV cache and weights.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from llmcore.errors import ConfigError
from llmcore.kserve.errors import KServeError
from llmcore.kserve.repository import UNLOAD_MODES, VersionSpec, list_models, read_model

log = logging.getLogger("llmcore.kserve")

DRAIN_POLL_S = 0.05
DEFAULT_DRAIN_S = 600.0


class Served(Protocol):
    """What the protocols need of a served model (the OpenAI server's ``ServedModel`` is one)."""

    name: str
    engine: Any  # an AsyncEngine: add_request, abort, is_running, stats, shutdown
    in_flight: int
    request_timeout: float | None

    @property
    def max_model_len(self) -> int: ...

    def admit(self, count: int, param: str = "prompt") -> None:
        """Take admission slots or raise an error carrying ``status`` (HTTP code) and ``message``."""


Builder = Callable[[VersionSpec], Served]  # blocking: runs in a worker thread


@dataclass
class Slot:
    """One version of one model and its state: READY, LOADING, UNLOADING or UNAVAILABLE."""

    name: str
    version: int
    key: str
    served: Served | None = None
    state: str = "LOADING"
    reason: str = ""
    settings: dict[str, Any] | None = None


class _View(Mapping):
    """Canonical name -> served model (READY only); lookups also take ``name`` and ``name:version``."""

    def __init__(self, live: "LiveModels") -> None:
        self._live = live

    def __getitem__(self, key: str) -> Served:
        served = self._live.find(key)
        if served is None:
            raise KeyError(key)
        return served

    def __iter__(self) -> Iterator[str]:
        return iter([s.key for s in self._live.slots() if s.state == "READY"])

    def __len__(self) -> int:
        return sum(1 for s in self._live.slots() if s.state == "READY")

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._live.find(key) is not None


def release_memory() -> None:
    """Give freed memory back: Python garbage, the CUDA cache, and glibc's free lists (so RSS drops)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class LiveModels:
    """The served models and the repository they come from.

    :param builder: builds one version (engine and all); blocking, run in a worker thread.
    :param repository: the model repository folder, or None (only fixed models).
    :param on_ready: called with the canonical name of every model that becomes ready (metrics).
    """

    def __init__(self, builder: Builder | None = None, repository: str | Path | None = None,
                 on_ready: Callable[[str], None] | None = None) -> None:
        self.builder = builder
        self.repository = Path(repository) if repository is not None else None
        self.on_ready = on_ready
        self._slots: dict[tuple[str, int], Slot] = {}
        self._failed: dict[str, str] = {}  # model -> why its last load failed
        self._unload_modes: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.by_name: Mapping[str, Served] = _View(self)

    # ------------------------------------------------------------ lookup

    def slots(self) -> list[Slot]:
        """In the order the models were added (command line first, then the repository's, sorted)."""
        return list(self._slots.values())

    def add(self, served: Served, name: str | None = None, version: int = 1,
            settings: dict[str, Any] | None = None) -> None:
        """Serve an already built model (``--model`` / ``--config`` ones: name = its own, version 1)."""
        name = name or served.name
        if (name, version) in self._slots or any(s.key == served.name for s in self._slots.values()):
            raise ConfigError("served_model_name", served.name, "is used twice", "Give every model a unique name")
        self._slots[(name, version)] = Slot(name, version, served.name, served, "READY", settings=settings)
        if self.on_ready is not None:
            self.on_ready(served.name)

    def versions(self, name: str) -> list[int]:
        return sorted(s.version for s in self._slots.values() if s.name == name and s.state == "READY")

    def find(self, key: str) -> Served | None:
        """``name:version``, a canonical name, or ``name`` (its highest ready version)."""
        for s in self._slots.values():
            if s.key == key and s.state == "READY":
                return s.served
        name, _, version = key.rpartition(":")
        if name and version.isdigit():
            s = self._slots.get((name, int(version)))
            return s.served if s is not None and s.state == "READY" else None
        ready = self.versions(key)
        return self._slots[(key, ready[-1])].served if ready else None

    def resolve(self, name: str, version: str | None = None) -> tuple[Served, int]:
        """The model and version a protocol request names (empty version: the highest), else NOT_FOUND."""
        ready = self.versions(name)
        if version:
            if not version.isdigit() or int(version) not in ready:
                raise self._not_found(name, version)
            v = int(version)
        elif ready:
            v = ready[-1]
        else:
            raise self._not_found(name, None)
        served = self._slots[(name, v)].served
        assert served is not None
        if not served.engine.is_running:
            raise KServeError("unavailable", f"model {name!r} version {v} is not available: its engine stopped")
        return served, v

    def settings(self, name: str, version: int) -> dict[str, Any]:
        return dict(self._slots[(name, version)].settings or {})

    def _not_found(self, name: str, version: str | None) -> KServeError:
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        ready = sorted({s.name for s in self._slots.values() if s.state == "READY"})
        known = f"; its loaded versions: {self.versions(name)}" if self.versions(name) else ""
        return KServeError("not_found", f"{what} is not loaded{known}. Loaded models: {', '.join(ready) or 'none'}")

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index: every version known, with its state (and models never loaded)."""
        rows = [{"name": s.name, "version": str(s.version), "state": s.state, "reason": s.reason}
                for s in self._slots.values()]
        if self.repository is not None:
            seen = {s.name for s in self._slots.values()}
            rows += [{"name": m, "version": "", "state": "UNAVAILABLE", "reason": self._failed.get(m, "not loaded")}
                     for m in list_models(self.repository) if m not in seen]
        rows.sort(key=lambda r: (r["name"], r["version"].zfill(12)))
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    # ------------------------------------------------------------ load / unload

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _read(self, name: str):
        if self.repository is None:
            raise KServeError("not_found", f"model {name!r}: the server has no model repository "
                                           "(start it with --model-repository DIR)")
        if self._fixed(name):
            raise KServeError("invalid", f"model {name!r} was given on the command line, not loaded from the "
                                         "repository; it cannot be loaded again")
        if "/" in name or name.startswith(".") or not (self.repository / name).is_dir():
            raise KServeError("not_found", f"model {name!r} is not in the model repository {self.repository}; "
                                           f"models there: {', '.join(list_models(self.repository)) or 'none'}")
        try:
            return read_model(self.repository, name)
        except ConfigError as exc:
            self._failed[name] = str(exc)
            raise KServeError("invalid", f"model {name!r} cannot load: {exc}") from None

    def _fixed(self, name: str) -> bool:
        """A model of the command line (or --config) holds this name: the repository cannot reuse it."""
        return any(s.name == name and s.key == name for s in self._slots.values())

    def load_startup(self) -> None:
        """Load every model of the repository before serving (blocking); the first failure is raised."""
        if self.repository is None:
            return
        for name in list_models(self.repository):
            if self._fixed(name):
                raise ConfigError("--model-repository", str(self.repository / name),
                                  f"holds a model named {name!r}, the name of a model given with --model/--config",
                                  "Give that model another --served-model-name")
            entry = read_model(self.repository, name)
            self._unload_modes[name] = entry.unload
            for spec in entry.versions:
                log.info("loading %s from %s", spec.key, spec.model or "the embedded model")
                self._ready(spec, self._build(spec))

    def _build(self, spec: VersionSpec) -> Served:
        if self.builder is None:
            raise KServeError("internal", "this server cannot build models (no builder)")
        return self.builder(spec)

    def _ready(self, spec: VersionSpec, served: Served) -> None:
        self._slots[(spec.name, spec.version)] = Slot(spec.name, spec.version, spec.key, served, "READY",
                                                      settings={"model": spec.model, **spec.engine_kwargs})
        self._failed.pop(spec.name, None)
        if self.on_ready is not None:
            self.on_ready(spec.key)

    async def load(self, name: str) -> list[int]:
        """Load (or reload) every version of ``name`` its policy names; returns the versions now ready.

        On failure the versions already serving stay as they were and the error says why.
        """
        async with self._lock(name):
            entry = self._read(name)
            built: list[tuple[VersionSpec, Served]] = []
            for spec in entry.versions:
                slot = self._slots.get((name, spec.version))
                if slot is None:
                    self._slots[(name, spec.version)] = Slot(name, spec.version, spec.key)
                try:
                    built.append((spec, await asyncio.to_thread(self._build, spec)))
                except Exception as exc:
                    log.warning("loading %s failed: %s", spec.key, exc)
                    for _, served in built:
                        await asyncio.to_thread(served.engine.shutdown)
                    for s in list(self._slots.values()):
                        if s.name == name and s.state == "LOADING":
                            del self._slots[(s.name, s.version)]
                    self._failed[name] = f"version {spec.version}: {type(exc).__name__}: {exc}"
                    release_memory()
                    raise KServeError("invalid", f"model {name!r} failed to load ({self._failed[name]}); "
                                                 "the other models keep serving") from exc
            old = [s for s in self._slots.values() if s.name == name and s.state == "READY"]
            self._unload_modes[name] = entry.unload
            for spec, served in built:
                self._ready(spec, served)
            replaced = [s for s in old if self._slots.get((s.name, s.version)) is not s]
            stale = [s for s in old if s.version not in {spec.version for spec, _ in built}]
            for s in stale:
                s.state = "UNLOADING"
            await self._retire(replaced + stale, entry.unload)
            for s in stale:
                self._slots.pop((s.name, s.version), None)
            return self.versions(name)

    async def unload(self, name: str, mode: str | None = None) -> None:
        """Stop serving every version of ``name``: ``drain`` (finish running requests) or ``abort``."""
        if mode is not None and mode not in UNLOAD_MODES:
            raise KServeError("invalid", f"parameters.mode: {mode!r} is not an unload mode; use drain or abort")
        async with self._lock(name):
            slots = [s for s in self._slots.values() if s.name == name and s.state == "READY"]
            if not slots:
                raise self._not_found(name, None)
            for s in slots:
                s.state = "UNLOADING"
            await self._retire(slots, mode or self._unload_modes.get(name, "drain"))
            for s in slots:
                s.state, s.reason = "UNAVAILABLE", "unloaded"
            if self.repository is None or not (self.repository / name).is_dir():
                for s in slots:
                    self._slots.pop((s.name, s.version), None)

    async def _retire(self, slots: list[Slot], mode: str) -> None:
        """Drain or abort, stop the engines and free their memory (the slots are already out of lookup)."""
        if mode == "drain":
            for s in slots:
                assert s.served is not None
                limit = s.served.request_timeout or DEFAULT_DRAIN_S
                waited = 0.0
                while s.served.in_flight > 0 and waited < limit:
                    await asyncio.sleep(DRAIN_POLL_S)
                    waited += DRAIN_POLL_S
        for s in slots:
            engine = s.served.engine if s.served is not None else None
            s.served = None  # the last reference: the engine's weights and KV cache go with it
            if engine is not None:
                log.info("stopping %s (%s)", s.key, mode)
                await asyncio.to_thread(engine.shutdown)
            del engine
        release_memory()

    def shutdown(self) -> None:
        for s in self._slots.values():
            if s.served is not None:
                s.served.engine.shutdown()
