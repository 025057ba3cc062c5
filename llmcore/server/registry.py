"""The served models: each engine with its admission limit (queue) and deadline, looked up by name.

Front ends share one :class:`ModelRegistry`: the OpenAI routes, and any other protocol added
beside them (KServe v2 over HTTP or gRPC). A request finds its model with
:meth:`ModelRegistry.get` (404 for an unknown name, 503 if its engine stopped) and holds an
admission slot while it runs (:meth:`ServedModel.admit` / :meth:`ServedModel.release`, or
:meth:`ServedModel.admitted`): past ``max_num_seqs + max_queue`` prompts in flight a model
answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from llmcore.engine.async_engine import AsyncEngine
from llmcore.engine.engine import Engine
from llmcore.errors import ConfigError
from llmcore.kserve.registry import LiveModels
from llmcore.server.errors import ApiError
from llmcore.server.responses import TokenDecoder
from llmcore.server.tool_parsers import PARSERS

log = logging.getLogger("llmcore.server")

DEFAULT_MAX_QUEUE = 256
DEFAULT_REQUEST_TIMEOUT = 600.0


@dataclass
class ServedModel:
    """One model behind the server: its engine and admission settings."""

    name: str
    engine: AsyncEngine
    max_queue: int | None = DEFAULT_MAX_QUEUE  # None = unbounded
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT  # None = no deadline
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    decode: TokenDecoder | None = None
    tool_call_parser: str | None = None  # None: chosen from the model's chat template

    def __post_init__(self) -> None:
        if self.decode is None:
            self.decode = TokenDecoder(self.engine.engine.tokenizer)
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ConfigError("tool_call_parser", self.tool_call_parser, "is not a known tool call parser",
                              f"Use one of {', '.join(PARSERS)}")

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.engine.config.max_num_seqs

    @property
    def capacity(self) -> int | None:
        return None if self.max_queue is None else self.max_num_seqs + self.max_queue

    def device_name(self) -> str:
        probe = getattr(self.engine.engine, "probe", None)
        return getattr(probe, "name", "unknown")

    def admit(self, count: int, param: str = "prompt") -> None:
        """Take ``count`` admission slots, or raise 503 (at capacity) / 400 (more than the limit at once)."""
        cap = self.capacity
        if cap is not None and self.in_flight + count > cap:
            if count > cap:
                raise ApiError(400, f"{param}: this request has {count} inputs; model {self.name!r} accepts at "
                               f"most {cap} at once", param=param, code="invalid_value")
            raise ApiError(
                503,
                f"Model {self.name!r} is at capacity ({self.in_flight} requests in flight, limit {cap} = "
                f"max_num_seqs {self.max_num_seqs} + max_queue {self.max_queue}). Retry shortly.",
                code="server_overloaded", headers={"Retry-After": "1"},
            )
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count

    @contextmanager
    def admitted(self, count: int, param: str = "prompt") -> Iterator[None]:
        """Hold ``count`` admission slots for the ``with`` block."""
        self.admit(count, param)
        try:
            yield
        finally:
            self.release(count)

    def stats(self) -> dict[str, Any]:
        """The engine's stats snapshot (never waits for the engine) plus the requests in flight."""
        s = self.engine.stats()
        s["in_flight"] = self.in_flight
        return s


class ModelRegistry:
    """The served models by name (insertion order), shared by every front end of one server.

    The models sit in a :class:`~llmcore.kserve.registry.LiveModels` set (``live``): a model
    repository's versions, loaded and unloaded at run time, show here at once; ``by_name`` is
    its live read-only view, whose lookups also take ``name:version``.
    """

    def __init__(self, models: Iterable[ServedModel], live: LiveModels | None = None) -> None:
        self.live = live if live is not None else LiveModels()
        for m in models:
            self.live.add(m)  # a name used twice is a ConfigError
        self.by_name: Mapping[str, ServedModel] = self.live.by_name
        if not self.by_name:
            raise ConfigError("models", [], "is empty", "Serve at least one model")

    @classmethod
    def build(cls, models: Mapping[str, AsyncEngine] | Iterable[ServedModel],
              max_queue: int | None = DEFAULT_MAX_QUEUE,
              request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
              live: LiveModels | None = None) -> ModelRegistry:
        """From ``{name: AsyncEngine}`` (with these limits) or from :class:`ServedModel` s."""
        if isinstance(models, Mapping):
            return cls((ServedModel(name, eng, max_queue, request_timeout) for name, eng in models.items()), live)
        return cls(models, live)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def find(self, name: str) -> ServedModel | None:
        return self.by_name.get(name)

    def get(self, name: str) -> ServedModel:
        """The model called ``name``, ready to take requests: else 404 (unknown) or 503 (engine stopped)."""
        m = self.by_name.get(name)
        if m is None:
            raise ApiError(404, f"The model `{name}` does not exist. Available: {', '.join(self.by_name)}.",
                           param="model", code="model_not_found")
        if not m.engine.is_running:
            raise ApiError(503, f"model {name!r} is not available: its engine stopped", code="engine_unavailable")
        return m

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{name: stats}`` for the metrics collector."""
        return {m.name: m.stats() for m in self}

    def shutdown(self) -> None:
        """Stop every model, those loaded at run time too."""
        self.live.shutdown()


def load_models(cfg: Any) -> list[ServedModel]:
    """Build one engine per model of a :class:`~llmcore.server.settings.ServeConfig` (the probe runs here).

    Used by ``llmcore serve`` and by every Ray Serve replica. If one model fails, the engines
    already built are stopped and the error propagates.
    """
    served: list[ServedModel] = []
    try:
        for spec in cfg.models:
            log.info("loading model %r (%s) %s", spec.name, spec.model or "embedded SmolLM2-135M-Instruct",
                     " ".join(f"{k}={v}" for k, v in spec.engine_kwargs.items()))
            engine = Engine(model=spec.model, **spec.engine_kwargs)
            served.append(ServedModel(
                spec.name, AsyncEngine(engine, name=spec.name),
                max_queue=cfg.max_queue if spec.max_queue == "default" else spec.max_queue,
                request_timeout=cfg.request_timeout if spec.request_timeout == "default" else spec.request_timeout,
                tool_call_parser=spec.tool_call_parser,
            ))
            log.info("model %r ready on %s (max_model_len %d, max_num_seqs %d)", spec.name,
                     engine.probe.name, engine.max_model_len, engine.config.max_num_seqs)
    except BaseException:
        for m in served:
            m.engine.shutdown()
        raise
    return served
