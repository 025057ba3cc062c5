"""The OpenAI-compatible HTTP server: a FastAPI app over one :class:`AsyncEngine` per model.

Routes: ``GET /v1/models`` (``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /health``,
``GET /metrics``, the chat page at ``/``, the OpenAPI schema at
``/openapi.json`` (Swagger UI at ``/docs``).

Behaviour under load: every prompt becomes one engine request that joins the
continuous batch. A model admits at most ``max_num_seqs + max_queue`` prompts
at once; past that the answer is 503 with ``Retry-After``. A client that hangs
up (streaming or not) aborts its requests, which frees their KV blocks before
the next engine step. Each request has a deadline (``request_timeout``): a
non-streaming request past it gets 504; a stream gets an error event and ends.
A body over ``max_body_bytes`` gets 413 before any of it is parsed.

More routes (another protocol over the same engines) come in through ``routers``: they read
the shared :class:`~llmcore.server.state.ServerState` with ``server_state(request)``, and the
app's API keys, metrics and error handling cover them too.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, Callable, Iterable, Mapping

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcore.engine.async_engine import AsyncEngine
from llmcore.kserve import http as kserve_http
from llmcore.kserve.registry import LiveModels
from llmcore.kserve.service import KServeService
from llmcore.server import openai_routes, ops_routes
from llmcore.server.convert import DEFAULT_CHAT_MAX_TOKENS
from llmcore.server.errors import ApiError, error_body, validation_error_to_api
from llmcore.server.middleware import (
    OPEN_PATHS,
    AuthMiddleware,
    BodySizeMiddleware,
    JsonBodyMiddleware,
    MetricsMiddleware,
)
from llmcore.server.registry import DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_TIMEOUT, ServedModel
from llmcore.server.settings import DEFAULT_MAX_BODY_BYTES
from llmcore.server.state import ServerState
from llmcore.version import __version__

__all__ = ["ServedModel", "ServerState", "create_app"]

log = logging.getLogger("llmcore.server")

DESCRIPTION = (
    "OpenAI-compatible API of llmcore. Errors use OpenAI's shape "
    '`{"error": {"message", "type", "param", "code"}}`: 400 for bad parameters (naming them), '
    "401 for a missing or wrong API key (every route but /health and the chat page), "
    "404 for an unknown model, 413 for a body over the server's limit, "
    "503 with Retry-After when a model is at capacity, "
    "504 when a request passes the server's request timeout."
)


def create_app(
    models: Mapping[str, AsyncEngine] | Iterable[ServedModel] | ServerState,
    api_keys: Iterable[str] | None = None,
    max_queue: int | None = DEFAULT_MAX_QUEUE,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    *,
    shutdown_engines: bool = False,
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    routers: Iterable[APIRouter] = (),
    live: LiveModels | None = None,
) -> FastAPI:
    """Build the FastAPI app.

    :param models: ``{served name: AsyncEngine}`` (server-wide ``max_queue`` /
        ``request_timeout`` apply), :class:`ServedModel` s with their own settings, or a
        :class:`ServerState` built beforehand (then the other settings are its own).
    :param api_keys: accepted Bearer keys; empty = no authentication.
    :param max_queue: prompts that may wait beyond ``max_num_seqs`` per model; ``None`` = unbounded.
    :param request_timeout: seconds per request; ``None`` = no deadline.
    :param shutdown_engines: stop the engines when the app shuts down.
    :param default_max_tokens: a chat request's ``max_tokens`` when it sets none.
    :param max_body_bytes: larger request bodies get 413; ``None`` = no limit.
    :param routers: more routes, served beside the OpenAI ones with the same keys and metrics.
    :param live: the model set with its repository (``llmcore serve --model-repository``); ``models``
        are added to it. The KServe v2 routes (``/v2/...``, always on) serve the same models.
    """
    if isinstance(models, ServerState):
        state = models
    else:
        state = ServerState.build(models, api_keys, max_queue, request_timeout,
                                  default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes, live=live)
    app = FastAPI(title="llmcore", version=__version__, description=DESCRIPTION,
                  lifespan=_lifespan(state, shutdown_engines), redoc_url=None)
    app.state.llmcore = state
    app.state.models = state.registry.by_name
    app.state.metrics = state.metrics
    _add_error_handlers(app)
    all_routers = (openai_routes.router, ops_routes.router, *routers)
    for router in all_routers:
        app.include_router(router)
    app.openapi = _openapi(app, state)  # type: ignore[method-assign]
    kserve_http.mount(app, KServeService(state.registry.live, state.metrics, [k.decode() for k in state.api_keys.keys]))
    # the route templates the request metrics name (any other path counts as "other")
    known = {getattr(r, "path", "") for rs in (app.routes, *(r.routes for r in all_routers)) for r in rs}
    _add_middleware(app, state, known - {""})
    return app


def _lifespan(state: ServerState, shutdown_engines: bool) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engines:
            state.registry.shutdown()

    return lifespan


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, pydantic's, Starlette's (404/405) and unexpected ones (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error_to_api(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(msg, "invalid_request_error", None, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)


def _openapi(app: FastAPI, state: ServerState) -> Callable[[], dict[str, Any]]:
    """The schema, with ``model`` restricted to the served names (a dropdown in /docs) and the key scheme."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        schema = base()
        comps = schema.get("components", {}).get("schemas", {})
        for comp in ("CompletionRequest", "ChatCompletionRequest", "EmbeddingRequest"):
            prop = comps.get(comp, {}).get("properties", {}).get("model")
            if prop is not None:
                prop["enum"] = state.registry.names
        if state.api_keys and "bearer" not in schema.get("components", {}).get("securitySchemes", {}):
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "one of the server's --api-key values"}
            for path, ops in schema.get("paths", {}).items():
                if path not in OPEN_PATHS:
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        return schema

    return openapi


def _add_middleware(app: FastAPI, state: ServerState, known_paths: set[str]) -> None:
    # the last added runs first: metrics see every answer, keys are checked before the body is read
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodySizeMiddleware, limit=state.max_body_bytes)
    app.add_middleware(AuthMiddleware, keys=state.api_keys)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, known_paths=known_paths)
