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
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmcore.engine.async_engine import AsyncEngine, EngineDeadError, OutputQueue, RequestAborted, RequestFailure
from llmcore.errors import ConfigError
from llmcore.outputs import RequestOutput
from llmcore.server.chat_page import CHAT_PAGE
from llmcore.server.metrics import ServerMetrics
from llmcore.server.openai_format import (
    ApiError,
    PromptInfo,
    ResponseBuilder,
    TokenDecoder,
    chat_messages,
    completion_prompts,
    config_error_to_api,
    embedding_inputs,
    encode_embedding,
    error_body,
    make_prepare,
    new_id,
    sampling_params,
    sse,
    validation_error_to_api,
)
from llmcore.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from llmcore.server.structured import chat_tools, precompile
from llmcore.server.tool_parsers import PARSERS
from llmcore.version import __version__

log = logging.getLogger("llmcore.server")

DEFAULT_MAX_QUEUE = 256
DEFAULT_REQUEST_TIMEOUT = 600.0
HEALTH_STATS_WAIT_S = 2.0
OPEN_PATHS = frozenset({"/health", "/"})  # no API key needed (the page is static and holds no data)


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


# ------------------------------------------------------------------ a request's run


class Job:
    """The engine requests of one API request (one per prompt), read together from one queue."""

    def __init__(self, served: ServedModel, base_id: str, num_prompts: int, metrics: ServerMetrics) -> None:
        self.served = served
        self.metrics = metrics
        self.queue = OutputQueue()
        self.rids = [f"{base_id}-{i}" for i in range(num_prompts)]
        self.index = {rid: i for i, rid in enumerate(self.rids)}
        self.finals: list[RequestOutput | None] = [None] * num_prompts
        self.unfinished = set(self.rids)
        self.arrival = time.monotonic()
        timeout = served.request_timeout
        self.deadline = None if timeout is None else self.arrival + timeout
        self._last: dict[str, float] = {}
        self._tokens: dict[str, int] = {}
        self._admitted = 0
        self.closed = False

    def admit(self) -> None:
        self.served.admit(len(self.rids))
        self._admitted = len(self.rids)

    async def start(self, prepares: list[Callable], aliases: dict[str, str]) -> None:
        eng = self.served.engine
        results = await asyncio.gather(
            *(eng.add_request(prepare=p, request_id=rid, queue=self.queue) for p, rid in zip(prepares, self.rids)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.close()
            exc = errors[0]
            if isinstance(exc, ConfigError):
                raise config_error_to_api(exc, aliases) from exc
            if isinstance(exc, EngineDeadError):
                raise ApiError(503, str(exc), code="engine_unavailable") from exc
            raise exc

    def _timeout_error(self) -> ApiError:
        return ApiError(504, f"Request timed out after {self.served.request_timeout:g} s (the server's "
                        "request_timeout); its generation was aborted", code="request_timeout",
                        type="timeout_error")

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(prompt_index, cumulative output)`` until every prompt finished."""
        q = self.queue
        while self.unfinished:
            if not q.empty():
                item = q.get_nowait()
            elif self.deadline is None:
                item = await q.get()
            else:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout_error()
                try:
                    item = await asyncio.wait_for(q.get(), remaining)
                except asyncio.TimeoutError:
                    raise self._timeout_error() from None
            if isinstance(item, RequestFailure):
                self.unfinished.discard(item.request_id)
                err = item.error
                if isinstance(err, EngineDeadError):
                    raise ApiError(503, str(err), code="engine_unavailable") from err
                if isinstance(err, RequestAborted):
                    raise ApiError(503, "the request was aborted", code="aborted") from err
                raise ApiError(500, f"generation failed: {err}", code="engine_error") from err
            self._account(item)
            rid = item.request_id
            if item.finished:
                self.unfinished.discard(rid)
                self.finals[self.index[rid]] = item
            yield self.index[rid], item

    def _account(self, out: RequestOutput) -> None:
        model = self.served.name
        rid = out.request_id
        now = time.monotonic()
        ntok = sum(len(o.token_ids) for o in out.outputs)
        prev = self._tokens.get(rid)
        if prev is None:  # first output (a chunked prefill may bring outputs without tokens)
            self.metrics.prompt_tokens.labels(model).inc(len(out.prompt_token_ids))
            prev = 0
        if ntok > prev:
            if prev == 0:
                self.metrics.ttft.labels(model).observe(now - self.arrival)
            else:
                self.metrics.itl.labels(model).observe(now - self._last[rid])
            self.metrics.generation_tokens.labels(model).inc(ntok - prev)
            self._last[rid] = now
        self._tokens[rid] = max(ntok, prev)

    def close(self) -> None:
        """Abort whatever has not finished and give the admission slots back (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for rid in self.unfinished:
            self.served.engine.abort(rid)
        if not self.unfinished and all(f is not None for f in self.finals):
            self.metrics.e2e.labels(self.served.name).observe(time.monotonic() - self.arrival)
        self.served.in_flight -= self._admitted
        self._admitted = 0


class SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client hanging up and always runs ``on_close``.

    Starlette only listens for ``http.disconnect`` for ASGI spec < 2.4 and never
    finalizes a body iterator that did not start; both would leak a request.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream_task = asyncio.ensure_future(self.stream_response(send))
        listen_task = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({stream_task, listen_task}, return_when=asyncio.FIRST_COMPLETED)
            for t in (stream_task, listen_task):
                if t not in done:
                    t.cancel()
            await asyncio.gather(stream_task, listen_task, return_exceptions=True)
            if stream_task in done and not stream_task.cancelled():
                exc = stream_task.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
        finally:
            stream_task.cancel()
            listen_task.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # pragma: no cover - defensive
                    log.exception("closing a stream failed")
            self.on_close()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ------------------------------------------------------------------ middleware


class _MetricsMiddleware:
    """Counts requests by route template, status and model (set by handlers on ``request.state``)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, known_paths: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known = set(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            status["code"] = 500 if status["code"] < 400 else status["code"]
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or scope.get("path", "")
            if path not in self.known:
                path = "other"
            model = (scope.get("state") or {}).get("llmcore_model", "")
            self.metrics.requests.labels(path, str(status["code"]), model).inc()


class _JsonBodyMiddleware:
    """Treat every POST body as JSON, as the OpenAI API does (``curl -d`` sends a form content type)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            ctype = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
            if b"json" not in ctype.lower():
                scope["headers"] = headers + [(b"content-type", b"application/json")]
        await self.app(scope, receive, send)


class _AuthMiddleware:
    """401 unless ``Authorization: Bearer <key>`` matches a key (all paths but /health and /)."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                auth = value
                break
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if token and any(hmac.compare_digest(token, k) for k in self.keys):
            await self.app(scope, receive, send)
            return
        msg = ("Incorrect API key provided." if token else
               "You didn't provide an API key. Pass it as 'Authorization: Bearer YOUR_KEY'.")
        resp = JSONResponse(error_body(msg, "authentication_error", None, "invalid_api_key"), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


# ------------------------------------------------------------------ errors


def _validation_error(exc: RequestValidationError) -> ApiError:
    return validation_error_to_api(exc.errors())


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ------------------------------------------------------------------ the app


def create_app(
    models: Mapping[str, AsyncEngine] | Iterable[ServedModel],
    api_keys: Iterable[str] | None = None,
    max_queue: int | None = DEFAULT_MAX_QUEUE,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    *,
    shutdown_engines: bool = False,
) -> FastAPI:
    """Build the FastAPI app.

    :param models: ``{served name: AsyncEngine}`` (server-wide ``max_queue`` /
        ``request_timeout`` apply) or :class:`ServedModel` s with their own settings.
    :param api_keys: accepted Bearer keys; empty = no authentication.
    :param max_queue: prompts that may wait beyond ``max_num_seqs`` per model; ``None`` = unbounded.
    :param request_timeout: seconds per request; ``None`` = no deadline.
    :param shutdown_engines: stop the engines when the app shuts down.
    """
    keys = [k for k in (api_keys or []) if k]
    if isinstance(models, Mapping):
        served = [ServedModel(name, eng, max_queue, request_timeout) for name, eng in models.items()]
    else:
        served = list(models)
    if not served:
        raise ConfigError("models", [], "is empty", "Serve at least one model")
    by_name: dict[str, ServedModel] = {}
    for m in served:
        if m.name in by_name:
            raise ConfigError("served_model_name", m.name, "is used twice", "Give every model a unique name")
        by_name[m.name] = m

    def snapshot() -> dict[str, dict[str, Any]]:
        out = {}
        for m in by_name.values():
            s = m.engine.stats()
            s["in_flight"] = m.in_flight
            out[m.name] = s
        return out

    metrics = ServerMetrics(snapshot)
    for name in by_name:
        metrics.init_model(name)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engines:
            for m in by_name.values():
                m.engine.shutdown()

    app = FastAPI(
        title="llmcore",
        version=__version__,
        description=(
            "OpenAI-compatible API of llmcore. Errors use OpenAI's shape "
            '`{"error": {"message", "type", "param", "code"}}`: 400 for bad parameters (naming them), '
            "401 for a missing or wrong API key (every route but /health and the chat page), "
            "404 for an unknown model, 503 with Retry-After when a model is at capacity, "
            "504 when a request passes the server's request timeout."
        ),
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.models = by_name
    app.state.metrics = metrics

    err_responses: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse, "description": "Bad request: `param` names the offending parameter"},
        401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
        404: {"model": ErrorResponse, "description": "Unknown model"},
        503: {"model": ErrorResponse, "description": "Model at capacity; retry after `Retry-After` seconds"},
        504: {"model": ErrorResponse, "description": "Request timeout"},
    }

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

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

    def get_model(name: str, request: Request) -> ServedModel:
        m = by_name.get(name)
        if m is None:
            raise ApiError(404, f"The model `{name}` does not exist. Available: {', '.join(by_name)}.",
                           param="model", code="model_not_found")
        request.state.llmcore_model = m.name
        if not m.engine.is_running:
            raise ApiError(503, f"model {name!r} is not available: its engine stopped", code="engine_unavailable")
        return m

    async def run(request: Request, job: Job, rb: ResponseBuilder, stream: bool, include_usage: bool) -> Response:
        if stream:
            async def body() -> AsyncIterator[str]:
                try:
                    for c in rb.start_chunks():
                        yield sse(c)
                    async for i, out in job.events():
                        chunk = rb.delta_chunk(i, out)
                        if chunk is not None:
                            yield sse(chunk)
                    if include_usage:
                        yield sse(rb.usage_chunk(job.finals))
                    yield sse("[DONE]")
                except ApiError as exc:
                    log.warning("stream %s ended with error: %s", rb.request_id, exc.message)
                    yield sse(exc.body())
                    yield sse("[DONE]")
                finally:
                    job.close()

            return SSEResponse(body(), on_close=job.close)

        async def collect() -> None:
            async for _ in job.events():
                pass

        task = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:  # the client hung up: abort now
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
            task.result()  # raises ApiError on timeout/failure
            return JSONResponse(rb.response(job.finals))  # type: ignore[arg-type]
        finally:
            watch.cancel()
            task.cancel()
            job.close()

    async def start_job(m: ServedModel, job: Job, prepares: list, aliases: dict[str, str]) -> None:
        job.admit()
        try:
            await job.start(prepares, aliases)
        except BaseException:
            job.close()
            raise

    # ------------------------------------------------------------ routes

    @app.get("/v1/models", response_model=ModelList, responses={401: err_responses[401]})
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "llmcore"} for m in by_name.values()
        ]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses={401: err_responses[401], 404: err_responses[404]})
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        m = by_name.get(model_id)
        if m is None:
            raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "llmcore"}

    @app.post(
        "/v1/completions", response_model=None,
        responses={200: {"model": CompletionResponse, "description": "A completion, or with `stream` an SSE stream",
                         "content": {"text/event-stream": {}}}, **err_responses},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        m = get_model(body.model, request)
        params, given, aliases = sampling_params(body, m.max_model_len)
        await precompile(m.engine.engine, params, aliases)
        prompts = completion_prompts(body)
        rid = new_id("cmpl")
        infos = [PromptInfo() for _ in prompts]
        prepares = [make_prepare(p, params, chat=False, max_tokens_given=given, info=info,
                                 want_prompt_text=bool(body.echo)) for p, info in zip(prompts, infos)]
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        rb = ResponseBuilder("completion", m.name, rid, len(prompts), params.n, params, decode=m.decode,
                             echo=bool(body.echo), include_usage=include_usage, infos=infos)
        job = Job(m, rid, len(prompts), metrics)
        await start_job(m, job, prepares, aliases)
        return await run(request, job, rb, bool(body.stream), include_usage)

    @app.post(
        "/v1/chat/completions", response_model=None,
        responses={200: {"model": ChatCompletionResponse,
                         "description": "A chat completion, or with `stream` an SSE stream of chunks",
                         "content": {"text/event-stream": {}}}, **err_responses},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        m = get_model(body.model, request)
        params, given, aliases = sampling_params(body, m.max_model_len)
        messages = chat_messages(body)
        tools, messages, template_tools, params = chat_tools(body, messages, params, aliases,
                                                             m.engine.engine.tokenizer, m.tool_call_parser)
        await precompile(m.engine.engine, params, aliases)
        rid = new_id("chatcmpl")
        info = PromptInfo()
        prepare = make_prepare(messages, params, chat=True, max_tokens_given=given, info=info, tools=template_tools)
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        rb = ResponseBuilder("chat", m.name, rid, 1, params.n, params, decode=m.decode,
                             top_logprobs=body.top_logprobs or 0, include_usage=include_usage, infos=[info],
                             tools=tools)
        job = Job(m, rid, 1, metrics)
        await start_job(m, job, [prepare], aliases)
        return await run(request, job, rb, bool(body.stream), include_usage)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse,
              responses={k: v for k, v in err_responses.items() if k != 504})
    async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
        """Embeddings are the model's **mean-pooled last hidden state** (not a trained embedding model)."""
        m = get_model(body.model, request)
        items = embedding_inputs(body)
        hidden = m.engine.engine.model_config.hidden_size
        if body.dimensions is not None and body.dimensions != hidden:
            raise ApiError(400, f"dimensions: only the model's hidden size ({hidden}) is supported",
                           param="dimensions", code="unsupported_parameter")
        m.admit(len(items), "input")
        try:
            def work(engine: Any) -> list[tuple[list[float], int]]:
                out = []
                for x in items:
                    n = len(engine.tokenizer.encode(x)) if isinstance(x, str) else len(x)
                    out.append((engine.embed(x), n))
                return out

            try:
                results = await m.engine.call(work)
            except ConfigError as exc:
                raise config_error_to_api(exc, {"prompt": "input", "prompt_token_ids": "input"}) from exc
        finally:
            m.in_flight -= len(items)
        ntok = sum(n for _, n in results)
        metrics.prompt_tokens.labels(m.name).inc(ntok)
        return JSONResponse({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, body.encoding_format)}
                     for i, (v, _) in enumerate(results)],
            "model": m.name,
            "usage": {"prompt_tokens": ntok, "total_tokens": ntok},
        })

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        """Liveness and per-model load: running/waiting sequences, in-flight requests, KV blocks used."""
        models: dict[str, Any] = {}
        ok = True
        for m in by_name.values():
            alive = m.engine.is_running
            s = m.engine.stats()
            if alive:  # exact figures, taken between two steps; the snapshot if the engine is slow
                try:
                    s = await asyncio.wait_for(m.engine.exact_stats(), HEALTH_STATS_WAIT_S)
                except (asyncio.TimeoutError, EngineDeadError):
                    pass
            ok = ok and alive
            models[m.name] = {
                "device": m.device_name(),
                "max_model_len": m.max_model_len,
                "num_running": s.get("num_running", 0),
                "num_waiting": s.get("num_waiting", 0),
                "in_flight": m.in_flight,
                "kv_blocks_used": s.get("kv_blocks_used", 0),
                "kv_blocks_total": s.get("kv_blocks_total", 0),
                "requests_aborted": s.get("requests_aborted", 0),
                "alive": alive,
            }
        return JSONResponse({"status": "ok" if ok else "error", "models": models}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The schema, with ``model`` restricted to the served names (a dropdown in /docs)."""
        schema = base_openapi()
        comps = schema.get("components", {}).get("schemas", {})
        for comp in ("CompletionRequest", "ChatCompletionRequest", "EmbeddingRequest"):
            prop = comps.get(comp, {}).get("properties", {}).get("model")
            if prop is not None:
                prop["enum"] = list(by_name)
        if keys and "bearer" not in schema.get("components", {}).get("securitySchemes", {}):
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "one of the server's --api-key values"}
            for path, ops in schema.get("paths", {}).items():
                if path not in OPEN_PATHS:
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    known = {getattr(r, "path", "") for r in app.routes}
    app.add_middleware(_JsonBodyMiddleware)
    app.add_middleware(_AuthMiddleware, keys=keys)
    app.add_middleware(_MetricsMiddleware, metrics=metrics, known_paths=known)
    return app
