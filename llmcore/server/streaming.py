"""HTTP answers for a :class:`~llmcore.server.jobs.Job`: a server-sent-event stream or one JSON body.

Either way a client that hangs up aborts the job at once, which frees its KV blocks before the
next engine step, and the job's admission slots are given back however it ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llmcore.server.errors import ApiError
from llmcore.server.jobs import Job
from llmcore.server.responses import ResponseBuilder, sse

log = logging.getLogger("llmcore.server")


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


async def _sse_events(job: Job, rb: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
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


async def respond(request: Request, job: Job, rb: ResponseBuilder, stream: bool, include_usage: bool) -> Response:
    """Answer a started job: an SSE stream, or the whole response once every prompt finished."""
    if stream:
        return SSEResponse(_sse_events(job, rb, include_usage), on_close=job.close)

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
