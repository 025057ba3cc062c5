"""What every front end of one server shares: the models, the API keys, the metrics and the limits.

``create_app`` builds one :class:`ServerState` and puts it on ``app.state.llmcore``; routes read
it with :func:`server_state`. Another front end (a gRPC server, extra HTTP routes) takes the
same object, so its requests count against the same queue limits, need the same keys and show
in the same ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from fastapi import Request

from llmcore.engine.async_engine import AsyncEngine
from llmcore.kserve.registry import LiveModels
from llmcore.server.convert import DEFAULT_CHAT_MAX_TOKENS
from llmcore.server.metrics import ServerMetrics
from llmcore.server.middleware import ApiKeys
from llmcore.server.registry import DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_TIMEOUT, ModelRegistry, ServedModel
from llmcore.server.settings import DEFAULT_MAX_BODY_BYTES


@dataclass
class ServerState:
    registry: ModelRegistry
    metrics: ServerMetrics
    api_keys: ApiKeys
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS  # a chat request's max_tokens when it sets none
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES  # None = no limit

    @classmethod
    def build(
        cls,
        models: Mapping[str, AsyncEngine] | Iterable[ServedModel],
        api_keys: Iterable[str] | None = None,
        max_queue: int | None = DEFAULT_MAX_QUEUE,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
        *,
        default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
        max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
        live: LiveModels | None = None,
    ) -> ServerState:
        registry = ModelRegistry.build(models, max_queue, request_timeout, live)
        metrics = ServerMetrics(registry.snapshot)
        for name in registry.names:
            metrics.init_model(name)
        registry.live.on_ready = metrics.init_model  # models loaded at run time get their series
        return cls(registry, metrics, ApiKeys(api_keys), default_max_tokens, max_body_bytes)


def server_state(request: Request) -> ServerState:
    return request.app.state.llmcore


def lookup_model(request: Request, name: str) -> ServedModel:
    """The model a request names (404/503 otherwise), recorded as the request's ``model`` metrics label."""
    state = server_state(request)
    if state.registry.find(name) is not None:
        request.state.llmcore_model = name
    return state.registry.get(name)
