"""The KServe v2 protocol over gRPC (``inference.GRPCInferenceService``), on the server's event loop.

Runs beside the HTTP server in the same process and on the same asyncio loop, over the same
engines: ``llmcore serve --grpc-port N``. API keys come as the ``authorization: Bearer KEY``
metadata entry (server liveness and readiness need none, as on HTTP). Every call is counted in the shared
``llmcore_requests_total`` series (route ``grpc:<method>``, status the gRPC code's name).

``ModelStreamInfer`` takes any number of requests on one call and runs them concurrently; each
streamed response carries the request's ``id`` and the parameter ``triton_final_response``
(true on its last response). An error on the stream is a response with ``error_message`` (the
call goes on); other methods end the call with the error's status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from fastapi import FastAPI
from google.protobuf import json_format

from llmcore.kserve import tensors as T
from llmcore.kserve.errors import KServeError, invalid
from llmcore.kserve.proto import grpc_service_pb2 as pb
from llmcore.kserve.proto import grpc_service_pb2_grpc as pb_grpc
from llmcore.kserve.service import InferReply, KServeService

log = logging.getLogger("llmcore.kserve")

FINAL = "triton_final_response"
GRACE_S = 5.0
REFUSE_DRAIN_S = 1.0  # how long a refused stream's requests are read before its status is sent


def _param_value(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _request_parts(req: Any) -> tuple[list[T.Tensor], dict[str, Any], list[str]]:
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise invalid(f"raw_input_contents: {len(raw)} buffers for {len(req.inputs)} inputs; send one per input")
    inputs = [T.from_proto(m, i, raw[i] if raw else None) for i, m in enumerate(req.inputs)]
    params = {k: _param_value(v) for k, v in req.parameters.items()}
    return inputs, params, [o.name for o in req.outputs]


def _response(reply: InferReply, request_id: str) -> Any:
    resp = pb.ModelInferResponse(model_name=reply.model_name, model_version=reply.model_version, id=request_id)
    for t in reply.tensors:
        resp.raw_output_contents.append(T.to_proto(t, resp.outputs.add()))
    resp.parameters[FINAL].bool_param = reply.final
    return resp


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: KServeService) -> None:
        self.service = service

    async def _call(self, method: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[Any]],
                    model: str = "", open_call: bool = False) -> Any:
        code = grpc.StatusCode.OK
        try:
            if not open_call:
                self.service.check_key(_authorization(context))
            return await fn()
        except KServeError as exc:
            code = exc.grpc_code
            await context.abort(exc.grpc_code, exc.message)
        finally:
            self.service.metrics.requests.labels(f"grpc:{method}", code.name, model).inc()

    # ------------------------------------------------------------ health and metadata

    async def ServerLive(self, request, context):
        return await self._call("ServerLive", context, _value(pb.ServerLiveResponse(live=True)), open_call=True)

    async def ServerReady(self, request, context):
        ready = self.service.server_ready()
        return await self._call("ServerReady", context, _value(pb.ServerReadyResponse(ready=ready)), open_call=True)

    async def ModelReady(self, request, context):
        ready = self.service.model_ready(request.name, request.version)
        return await self._call("ModelReady", context, _value(pb.ModelReadyResponse(ready=ready)), request.name)

    async def ServerMetadata(self, request, context):
        async def run():
            return json_format.ParseDict(self.service.server_metadata(), pb.ServerMetadataResponse())
        return await self._call("ServerMetadata", context, run)

    async def ModelMetadata(self, request, context):
        async def run():
            meta = self.service.model_metadata(request.name, request.version)
            return json_format.ParseDict(meta, pb.ModelMetadataResponse())
        return await self._call("ModelMetadata", context, run, request.name)

    async def ModelConfig(self, request, context):
        async def run():
            cfg = self.service.model_config(request.name, request.version)
            return pb.ModelConfigResponse(config=json_format.ParseDict(cfg, pb.ModelConfig()))
        return await self._call("ModelConfig", context, run, request.name)

    # ------------------------------------------------------------ inference

    async def ModelInfer(self, request, context):
        async def run():
            inputs, params, requested = _request_parts(request)
            replies = self.service.infer(request.model_name, request.model_version, inputs, params, requested,
                                         streaming=False)
            try:
                async for reply in replies:
                    return _response(reply, request.id)
            finally:
                await replies.aclose()
            raise KServeError("internal", "the request ended without a response")
        return await self._call("ModelInfer", context, run, request.model_name)

    async def ModelStreamInfer(self, request_iterator, context):
        code = grpc.StatusCode.OK
        try:
            self.service.check_key(_authorization(context))
        except KServeError as exc:
            self.service.metrics.requests.labels("grpc:ModelStreamInfer", exc.grpc_code.name, "").inc()
            # Read what the client is sending first (up to REFUSE_DRAIN_S): aborting while its
            # writes are in flight makes grpc's client report INTERNAL "Internal error from Core"
            # in place of this status, depending on timing.
            await _drain(request_iterator, REFUSE_DRAIN_S)
            await context.abort(exc.grpc_code, exc.message)
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def run_one(req: Any) -> None:
            try:
                inputs, params, requested = _request_parts(req)
                async for reply in self.service.infer(req.model_name, req.model_version, inputs, params, requested,
                                                      streaming=True):
                    await out.put(pb.ModelStreamInferResponse(infer_response=_response(reply, req.id)))
            except KServeError as exc:
                err = pb.ModelInferResponse(model_name=req.model_name, model_version=req.model_version, id=req.id)
                await out.put(pb.ModelStreamInferResponse(error_message=exc.message, infer_response=err))

        async def read_requests() -> None:
            async for req in request_iterator:
                task = asyncio.ensure_future(run_one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await out.put(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while (item := await out.get()) is not None:
                yield item
            await reader
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()  # aborts their generations
            self.service.metrics.requests.labels("grpc:ModelStreamInfer", code.name, "").inc()

    # ------------------------------------------------------------ repository

    async def RepositoryIndex(self, request, context):
        async def run():
            rows = self.service.index(request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])
        return await self._call("RepositoryIndex", context, run)

    async def RepositoryModelLoad(self, request, context):
        async def run():
            await self.service.load(request.model_name, dict(request.parameters))
            return pb.RepositoryModelLoadResponse()
        return await self._call("RepositoryModelLoad", context, run, request.model_name)

    async def RepositoryModelUnload(self, request, context):
        async def run():
            mode = request.parameters["mode"].string_param if "mode" in request.parameters else None
            await self.service.unload(request.model_name, mode)
            return pb.RepositoryModelUnloadResponse()
        return await self._call("RepositoryModelUnload", context, run, request.model_name)


async def _drain(request_iterator: AsyncIterator[Any], timeout_s: float) -> None:
    """Read and drop a stream's requests until the client half-closes it or ``timeout_s`` passes."""
    async def read_all() -> None:
        async for _ in request_iterator:
            pass
    with contextlib.suppress(asyncio.TimeoutError, grpc.RpcError):
        await asyncio.wait_for(read_all(), timeout_s)


def _value(msg: Any) -> Callable[[], Awaitable[Any]]:
    async def run() -> Any:
        return msg
    return run


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


async def start(service: KServeService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on the running loop; returns it and the port it listens on (``port`` 0: any free)."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"--grpc-port: cannot listen on {address}")
    await server.start()
    return server, bound


def attach(app: FastAPI, service: KServeService, host: str, port: int,
           announce: Callable[[str], None] = print) -> None:
    """Run the gRPC server for as long as the app runs (started and stopped by its lifespan)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            server, bound = await start(service, host, port)
            shown = f"[{host}]" if ":" in host else host
            announce(f"llmcore serve: KServe v2 gRPC at {shown}:{bound}")
            try:
                yield state
            finally:
                await server.stop(GRACE_S)

    app.router.lifespan_context = lifespan
