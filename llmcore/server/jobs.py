"""One API request's run on the engine: its engine requests (one per prompt), read from one queue.

:class:`Job` takes the model's admission slots, adds the requests, yields their outputs until
all finished or the deadline passed, counts tokens and latencies into the metrics, and on
:meth:`Job.close` aborts whatever has not finished and gives the slots back. No web framework
here: the HTTP routes stream or collect it, another front end (gRPC) can do the same.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable

from llmcore.engine.async_engine import EngineDeadError, OutputQueue, RequestAborted, RequestFailure
from llmcore.errors import ConfigError
from llmcore.outputs import RequestOutput
from llmcore.server.errors import ApiError, config_error_to_api
from llmcore.server.metrics import ServerMetrics
from llmcore.server.registry import ServedModel


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

    async def start(self, prepares: list[Callable], aliases: dict[str, str]) -> None:
        """Take the admission slots and add one engine request per prompt; on any error, give all back."""
        self.served.admit(len(self.rids))
        self._admitted = len(self.rids)
        try:
            await self._add(prepares, aliases)
        except BaseException:
            self.close()
            raise

    async def _add(self, prepares: list[Callable], aliases: dict[str, str]) -> None:
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
        self.served.release(self._admitted)
        self._admitted = 0
