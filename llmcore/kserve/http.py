"""The KServe v2 protocol over HTTP/REST, as routes added to the server's FastAPI app.

Routes (``/versions/{v}`` may follow ``/v2/models/{m}`` everywhere):

- ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``: server metadata and health
- ``GET /v2/models/{m}``, ``.../ready``, ``.../config``: model metadata, readiness, configuration
- ``POST /v2/models/{m}/infer``: inference (JSON, or JSON + binary tensor data)
- ``POST /v2/models/{m}/generate`` and ``.../generate_stream`` (server-sent events): the generate
  extension, ``{"text_input": "...", "parameters": {"max_tokens": 16}}``
- ``POST /v2/repository/index``, ``POST /v2/repository/models/{m}/load|unload``

Errors are ``{"error": "message"}`` with 400 (bad request), 401 (API key), 404 (unknown model or
version), 503 (at capacity, model stopped) or 504 (request timeout). The API keys, queue limits
and metrics are the OpenAI server's: the routes live in the same app, behind the same middleware.
"""

from __future__ import annotations

import asyncio
import json
from enum import Enum
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmcore.kserve import tensors as T
from llmcore.kserve.errors import KServeError, invalid
from llmcore.kserve.service import InferReply, KServeService
from llmcore.kserve.textgen import INPUTS

HEADER_LENGTH = "Inference-Header-Content-Length"
TAGS: list[str | Enum] = ["KServe v2"]
IN_SCHEMA = False  # a tensor protocol, documented in docs/triton.md, not by an OpenAPI schema
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # probes need no API key


def _error(exc: KServeError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.http_status, headers=exc.headers)


async def _json_body(request: Request) -> tuple[dict[str, Any], bytes]:
    """The JSON header and, with the binary-data extension, the bytes after it."""
    body = await request.body()
    size = request.headers.get(HEADER_LENGTH)
    if size is not None:
        if not size.isdigit() or int(size) > len(body):
            raise invalid(f"{HEADER_LENGTH}: {size!r} is not a length within the {len(body)}-byte body")
        head, rest = body[:int(size)], body[int(size):]
    else:
        head, rest = body, b""
    try:
        obj = json.loads(head or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise invalid("the request body must be a JSON object")
    return obj, rest


def _inputs(obj: dict[str, Any], binary: bytes) -> list[T.Tensor]:
    items = obj.get("inputs")
    if not isinstance(items, list):
        raise invalid("inputs: missing or not a list; send [{\"name\": \"text_input\", \"shape\": [1], "
                      "\"datatype\": \"BYTES\", \"data\": [\"...\"]}]")
    out, pos = [], 0
    for i, item in enumerate(items):
        size = ((item.get("parameters") or {}).get("binary_data_size") if isinstance(item, dict) else None)
        chunk = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or pos + size > len(binary):
                raise invalid(f"inputs[{i}].parameters.binary_data_size: {size!r} does not fit the "
                              f"{len(binary) - pos} binary bytes left")
            chunk, pos = binary[pos:pos + size], pos + size
        out.append(T.from_json(item, i, chunk))
    return out


def _parameters(obj: dict[str, Any], where: str = "parameters") -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid(f"{where}: must be a JSON object")
    return params


def _requested(obj: dict[str, Any]) -> tuple[list[str], set[str]]:
    """Names of the requested outputs and those asked for in binary."""
    items = obj.get("outputs") or []
    if not isinstance(items, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in items):
        raise invalid("outputs: must be a list of {\"name\": ...} objects")
    binary = {o["name"] for o in items if (o.get("parameters") or {}).get("binary_data")}
    return [o["name"] for o in items], binary


def _infer_response(reply: InferReply, request_id: str | None, binary: set[str], all_binary: bool) -> Response:
    body: dict[str, Any] = {"model_name": reply.model_name, "model_version": reply.model_version}
    if request_id:
        body["id"] = request_id
    outputs, raw = [], []
    for t in reply.tensors:
        js, data = T.to_json(t, all_binary or t.name in binary)
        outputs.append(js)
        raw.append(data)
    body["outputs"] = outputs
    head = json.dumps(body).encode()
    if not any(raw):
        return Response(head, media_type="application/json")
    return Response(head + b"".join(raw), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})


def _generate_json(reply: InferReply, request_id: str | None) -> dict[str, Any]:
    """The generate extension's flat answer: one key per output (a scalar when it has one element)."""
    out: dict[str, Any] = {"model_name": reply.model_name, "model_version": reply.model_version}
    if request_id:
        out["id"] = request_id
    for t in reply.tensors:
        vals = [x.decode("utf-8", "replace") for x in t.data] if t.datatype == "BYTES" else list(t.data)
        out[t.name] = vals[0] if len(vals) == 1 else vals
    return out


def _generate_inputs(obj: dict[str, Any]) -> list[T.Tensor]:
    """The generate extension's body: top-level keys are the inputs, as plain JSON values."""
    out = []
    for key, value in obj.items():
        if key in ("parameters", "id"):
            continue
        if key not in INPUTS:
            raise invalid(f"{key}: unknown input; this model takes {', '.join(INPUTS)} (and parameters)")
        datatype = INPUTS[key][0]
        if key == "sampling_parameters" and isinstance(value, dict):
            value = json.dumps(value)
        if datatype == "BYTES" and not isinstance(value, str):
            raise invalid(f"{key}: must be a string, got {type(value).__name__}")
        if datatype == "BOOL" and not isinstance(value, bool):
            raise invalid(f"{key}: must be true or false, got {value!r}")
        data = value.encode("utf-8") if isinstance(value, str) else value
        out.append(T.Tensor(key, datatype, [1], [data], where=key))
    return out


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _one(replies: AsyncIterator[InferReply], request: Request) -> InferReply | None:
    """The single reply of a non-streaming call; None if the client hung up first (the request is aborted)."""
    async def first() -> InferReply:
        async for r in replies:
            return r
        raise KServeError("internal", "the request ended without a response")

    task = asyncio.ensure_future(first())
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            return None
        return task.result()
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
        await replies.aclose()


def add_routes(r: APIRouter | FastAPI, service: KServeService) -> None:
    """Add the routes to an app (so they are listed in ``app.routes``) or to a router."""
    versioned = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")

    @r.get("/v2", tags=TAGS, include_in_schema=IN_SCHEMA)
    async def server_metadata() -> dict[str, Any]:
        return service.server_metadata()

    @r.get("/v2/health/live", tags=TAGS, include_in_schema=IN_SCHEMA)
    async def live() -> dict[str, Any]:
        return {"live": True}

    @r.get("/v2/health/ready", tags=TAGS, include_in_schema=IN_SCHEMA)
    async def ready() -> JSONResponse:
        ok = service.server_ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 400)

    async def model_metadata(model: str, version: str | None = None) -> dict[str, Any]:
        return service.model_metadata(model, version)

    async def model_ready(model: str, version: str | None = None) -> JSONResponse:
        ok = service.model_ready(model, version)
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 400)

    async def model_config(model: str, version: str | None = None) -> dict[str, Any]:
        return service.model_config(model, version)

    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        request.state.llmcore_model = model
        obj, binary = await _json_body(request)
        requested, binary_out = _requested(obj)
        params = _parameters(obj)
        replies = service.infer(model, version, _inputs(obj, binary), params, requested, streaming=False)
        reply = await _one(replies, request)
        if reply is None:
            return Response(status_code=499)
        return _infer_response(reply, obj.get("id"), binary_out, bool(params.get("binary_data_output")))

    async def generate(model: str, request: Request, version: str | None = None) -> Response:
        request.state.llmcore_model = model
        obj, _ = await _json_body(request)
        replies = service.infer(model, version, _generate_inputs(obj), _parameters(obj), [], streaming=False)
        reply = await _one(replies, request)
        if reply is None:
            return Response(status_code=499)
        return JSONResponse(_generate_json(reply, obj.get("id")))

    async def generate_stream(model: str, request: Request, version: str | None = None) -> Response:
        request.state.llmcore_model = model
        obj, _ = await _json_body(request)
        params = {"stream": True, **_parameters(obj)}
        replies = service.infer(model, version, _generate_inputs(obj), params, [], streaming=True)
        first = await anext(replies, None)  # errors before the first token are plain HTTP errors

        async def events() -> AsyncIterator[str]:
            try:
                reply = first
                while reply is not None:
                    yield f"data: {json.dumps(_generate_json(reply, obj.get('id')))}\n\n"
                    reply = await anext(replies, None)
            except KServeError as exc:
                yield f"data: {json.dumps({'error': exc.message})}\n\n"
            finally:
                await replies.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    for base in versioned:
        for suffix, fn, method in (("", model_metadata, "GET"), ("/ready", model_ready, "GET"),
                                   ("/config", model_config, "GET"), ("/infer", infer, "POST"),
                                   ("/generate", generate, "POST"), ("/generate_stream", generate_stream, "POST")):
            r.add_api_route(base + suffix, fn, methods=[method], tags=TAGS, include_in_schema=IN_SCHEMA)

    @r.post("/v2/repository/index", tags=TAGS, include_in_schema=IN_SCHEMA)
    async def repository_index(request: Request) -> list[dict[str, str]]:
        obj, _ = await _json_body(request)
        return service.index(bool(obj.get("ready", False)))

    @r.post("/v2/repository/models/{model}/load", tags=TAGS, include_in_schema=IN_SCHEMA)
    async def load(model: str, request: Request) -> dict[str, Any]:
        obj, _ = await _json_body(request)
        await service.load(model, _parameters(obj))
        return {}

    @r.post("/v2/repository/models/{model}/unload", tags=TAGS, include_in_schema=IN_SCHEMA)
    async def unload(model: str, request: Request) -> dict[str, Any]:
        obj, _ = await _json_body(request)
        mode = _parameters(obj).get("mode")
        await service.unload(model, mode)
        return {}


def mount(app: FastAPI, service: KServeService) -> None:
    """Add the KServe routes and their error handler to the server's app."""
    add_routes(app, service)

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, KServeError)
        return _error(exc)

    app.add_exception_handler(KServeError, handle)
    app.state.kserve = service
