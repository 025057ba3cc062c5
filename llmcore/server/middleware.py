"""ASGI middleware of the HTTP server: API keys, request-body size, JSON bodies, request metrics.

The checks themselves are plain objects other front ends reuse: :class:`ApiKeys` answers
"is this ``Authorization`` value allowed" for any protocol (a gRPC interceptor passes the
``authorization`` metadata), :class:`~llmcore.server.metrics.ServerMetrics` counts any request.
"""

from __future__ import annotations

import hmac
from typing import Iterable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmcore.server.errors import ApiError
from llmcore.server.metrics import ServerMetrics

# no API key needed: health probes, and the chat page (static, holds no data)
OPEN_PATHS = frozenset({"/health", "/", "/v2/health/live", "/v2/health/ready"})


class ApiKeys:
    """The accepted Bearer keys; none = no authentication."""

    def __init__(self, keys: Iterable[str] | None) -> None:
        self.keys = [k.encode() for k in (keys or []) if k]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | bytes | None) -> None:
        """Accept ``Bearer <key>`` for a known key (anything if there are no keys); else raise a 401."""
        if not self.keys:
            return
        auth = authorization.encode() if isinstance(authorization, str) else (authorization or b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if token and any(hmac.compare_digest(token, k) for k in self.keys):
            return
        msg = ("Incorrect API key provided." if token else
               "You didn't provide an API key. Pass it as 'Authorization: Bearer YOUR_KEY'.")
        raise ApiError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v
    return None


async def _send_error(err: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    # the KServe v2 routes answer errors as {"error": "message"} (the protocol's shape), the
    # OpenAI ones as {"error": {"message": ..., "type": ..., "code": ...}}
    body = {"error": err.message} if str(scope.get("path", "")).startswith("/v2/") else err.body()
    await JSONResponse(body, status_code=err.status, headers=err.headers)(scope, receive, send)


class AuthMiddleware:
    """401 unless the request carries an accepted key (every path but ``open_paths``)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") not in self.open_paths:
            try:
                self.keys.check(_header(scope, b"authorization"))
            except ApiError as err:
                await _send_error(err, scope, receive, send)
                return
        await self.app(scope, receive, send)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than this server's limit of {limit} bytes "
                    f"({limit / 2**20:.1f} MiB). Send less, or start the server with a larger --max-body-bytes.",
                    code="request_too_large")


class BodySizeMiddleware:
    """413 for a body over ``limit`` bytes, before any of it is parsed.

    A declared ``Content-Length`` over the limit is refused before reading; a body without one
    (chunked) is read up to the limit first and refused as soon as it passes it.
    """

    def __init__(self, app: ASGIApp, limit: int | None) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit is None:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await _send_error(body_too_large(self.limit), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        size = 0
        while not read or read[-1]["type"] == "http.request" and read[-1].get("more_body", False):
            message = await receive()
            read.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await _send_error(body_too_large(self.limit), scope, receive, send)
                return

        async def replay() -> Message:
            return read.pop(0) if read else await receive()

        await self.app(scope, replay, send)


class JsonBodyMiddleware:
    """Treat every POST body as JSON, as the OpenAI API does (``curl -d`` sends a form content type)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            ctype = _header(scope, b"content-type") or b""
            if b"json" not in ctype.lower():
                headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
                scope["headers"] = headers + [(b"content-type", b"application/json")]
        await self.app(scope, receive, send)


class MetricsMiddleware:
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
            self.metrics.count_request(path, status["code"], model)
