"""Asyncio front end for the synchronous :class:`~llmcore.engine.engine.Engine`.

(Over 450 lines on purpose: the engine thread, its command queue and the per-request output
queues are one concurrency design and are read together.)

The engine is not thread-safe, so exactly one background thread owns it: that
thread runs :meth:`Engine.step` while there is work and sleeps on a condition
variable otherwise. Coroutines never touch the engine; they queue *commands*
(add, abort, call) that the engine thread applies between two steps, in the
order they were queued. Outputs go back to each request's queue
(:class:`OutputQueue`) through ``loop.call_soon_threadsafe`` (one wake-up per
event loop per step, however many requests advanced).

>>> aeng = AsyncEngine(Engine(model=None))
>>> async for out in aeng.generate("Hello", SamplingParams(max_tokens=8)):
...     print(out.outputs[0].text)
>>> aeng.shutdown()

Leaving the ``async for`` early (``break``, cancellation, a client that hung
up) aborts the request on the engine thread, which frees its KV blocks before
the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from llmcore.engine.engine import Engine
from llmcore.errors import LlmcoreError
from llmcore.outputs import RequestOutput
from llmcore.sampling_params import SamplingParams

log = logging.getLogger("llmcore.async_engine")

#: Built on the engine thread: ``prepare(engine) -> (prompt, params)``.
Prepare = Callable[[Any], "tuple[str | Sequence[int], SamplingParams]"]

_STATS_INTERVAL = 0.05  # seconds between stats snapshots while busy


class EngineDeadError(LlmcoreError):
    """The engine thread has stopped (shut down, or crashed); no request can be served."""


class RequestAborted(LlmcoreError):
    """The request was aborted (by :meth:`AsyncEngine.abort`) before it finished."""


@dataclass(slots=True)
class RequestFailure:
    """Put on a request's queue instead of an output when the request failed."""

    request_id: str
    error: BaseException


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: Any
    params: SamplingParams | None
    prepare: Prepare | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    future: asyncio.Future


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Call:
    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Counters:
    requests_added: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0
    step_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class OutputQueue:
    """Where a request's outputs wait for their reader: the latest output per request, oldest request first.

    Outputs are cumulative, so when a reader falls behind (a slow client) only the newest output of
    each request is kept instead of one per step: memory stays bounded by the number of requests.
    A :class:`RequestFailure` is final and is never replaced. Use it from one event loop only
    (the engine thread reaches it through ``loop.call_soon_threadsafe``).
    """

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: Any) -> None:
        rid = item.request_id
        if isinstance(self._items.get(rid), RequestFailure):
            return
        self._items[rid] = item
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        rid = next(iter(self._items))
        return self._items.pop(rid)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncEngine:
    """One :class:`Engine` driven by a dedicated thread, used from asyncio.

    :param engine: a constructed engine; the AsyncEngine owns it from now on
        (do not call it from other threads).
    :param name: a label for logs and metrics (defaults to the model folder name).
    :param start: start the engine thread now (default) or on :meth:`start`.
    """

    def __init__(self, engine: Any, name: str | None = None, *, start: bool = True) -> None:
        self.engine = engine
        self.name = name or getattr(getattr(engine, "model_path", None), "name", None) or "model"
        self._cond = threading.Condition()
        self._commands: deque[Any] = deque()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._stopping = False
        self._dead: BaseException | None = None
        self._counters = _Counters()
        self._stats: dict[str, Any] = dict(engine.stats())
        self._stats_time = 0.0
        self._thread = threading.Thread(target=self._run, name=f"llmcore-engine-{self.name}", daemon=True)
        self._started = False
        if start:
            self.start()

    @classmethod
    def from_engine_args(cls, name: str | None = None, **engine_kwargs: Any) -> "AsyncEngine":
        """Build the :class:`Engine` (same keyword arguments) and wrap it."""

        return cls(Engine(**engine_kwargs), name=name)

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._started and self._thread.is_alive() and self._dead is None and not self._stopping

    @property
    def dead_reason(self) -> BaseException | None:
        return self._dead

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread; requests still running fail with :class:`EngineDeadError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._started and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        # then what the engine runs outside this process (tensor-parallel workers)
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None and (not self._started or not self._thread.is_alive()):
            stop()

    def __enter__(self) -> "AsyncEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------ submission

    def _submit(self, cmd: Any) -> None:
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError(f"engine {self.name!r} stopped: {self._dead}")
            if self._stopping:
                raise EngineDeadError(f"engine {self.name!r} is shutting down")
            self._commands.append(cmd)
            self._cond.notify()

    async def add_request(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        prepare: Prepare | None = None,
        queue: OutputQueue | asyncio.Queue | None = None,
    ) -> tuple[str, OutputQueue | asyncio.Queue]:
        """Queue a request; return ``(request_id, queue)`` once the engine accepted it.

        Outputs (:class:`RequestOutput`, cumulative) and failures
        (:class:`RequestFailure`) arrive on ``queue`` (an :class:`OutputQueue`
        unless you pass one; an ``asyncio.Queue`` keeps every output instead of
        the latest); pass one queue to several requests to read them together. ``prepare(engine) -> (prompt, params)``
        runs on the engine thread instead of taking ``prompt``/``params``: use it
        for work that needs the engine's tokenizer (chat templates, length checks).
        Errors from :meth:`Engine.add_request` (``RequestError``, ``ConfigError``)
        are raised here unchanged.
        """
        if self._started is False:
            self.start()
        loop = asyncio.get_running_loop()
        rid = request_id if request_id is not None else uuid.uuid4().hex
        q = queue if queue is not None else OutputQueue()
        fut = loop.create_future()
        self._submit(_Add(rid, prompt, params, prepare, loop, q, fut))
        try:
            await fut
        except asyncio.CancelledError:
            # the add is queued already; make sure it does not run on without a reader
            self.abort(rid)
            raise
        return rid, q

    async def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        prepare: Prepare | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative :class:`RequestOutput` s until the request finishes.

        Closing the iterator early (or cancelling the task) aborts the request.
        """
        rid, q = await self.add_request(prompt, params, request_id, prepare=prepare)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, RequestFailure):
                    finished = True
                    raise item.error
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, non-blocking); its KV blocks are freed before the next step."""
        try:
            self._submit(_Abort(request_id))
        except EngineDeadError:
            pass

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between two steps and return its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._submit(_Call(fn, loop, fut))
        return await fut

    async def embed(self, text: str | Sequence[int]) -> list[float]:
        """Mean-pooled last hidden state of ``text`` (see :meth:`Engine.embed`)."""
        return await self.call(lambda e: e.embed(text))

    def stats(self) -> dict[str, Any]:
        """A recent snapshot of :meth:`Engine.stats` (never blocks; exact whenever the engine is idle).

        Adds ``num_streams`` (requests this wrapper is delivering) and counters.
        """
        return dict(self._stats)

    async def exact_stats(self) -> dict[str, Any]:
        """:meth:`Engine.stats` taken on the engine thread (waits for the current step)."""
        return await self.call(lambda e: self._make_stats())

    # ---------------------------------------------------------- engine thread

    def _make_stats(self) -> dict[str, Any]:
        s = dict(self.engine.stats())
        c = self._counters
        s.update(
            num_streams=len(self._streams),
            requests_added=c.requests_added,
            requests_finished=c.requests_finished,
            requests_aborted=c.requests_aborted,
            requests_failed=c.requests_failed,
            step_errors=c.step_errors,
        )
        return s

    def _snapshot(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._stats_time >= _STATS_INTERVAL:
            self._stats = self._make_stats()
            self._stats_time = now

    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not eng.has_unfinished_requests():
                        self._snapshot(force=True)
                        self._cond.wait()
                    if self._stopping:
                        break
                    cmds = list(self._commands)
                    self._commands.clear()
                for cmd in cmds:
                    self._handle(cmd)
                if eng.has_unfinished_requests():
                    try:
                        outs = eng.step()
                    except Exception as exc:  # a failed step must not kill the server
                        log.exception("engine %s: step failed; failing its running requests", self.name)
                        self._counters.step_errors += 1
                        self._fail_all(exc)
                        continue
                    self._deliver(outs)
                self._snapshot()
        except BaseException as exc:  # pragma: no cover - defensive
            log.exception("engine %s: engine thread crashed", self.name)
            self._dead = exc
        finally:
            with self._cond:
                self._stopping = True
                pending = list(self._commands)
                self._commands.clear()
            reason = self._dead or "shut down"
            err = EngineDeadError(f"engine {self.name!r} stopped: {reason}")
            for cmd in pending:
                if isinstance(cmd, (_Add, _Call)):
                    self._resolve(cmd.loop, _set_exception, cmd.future, err)
            self._fail_all(err, abort=False)
            self._snapshot(force=True)

    @staticmethod
    def _resolve(loop: asyncio.AbstractEventLoop, fn: Callable, fut: asyncio.Future, value: Any) -> bool:
        try:
            loop.call_soon_threadsafe(fn, fut, value)
            return True
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False

    def _handle(self, cmd: Any) -> None:
        eng = self.engine
        if isinstance(cmd, _Add):
            try:
                if cmd.prepare is not None:
                    prompt, params = cmd.prepare(eng)
                else:
                    prompt, params = cmd.prompt, cmd.params
                rid = eng.add_request(prompt, params, cmd.request_id)
            except Exception as exc:
                self._counters.requests_failed += 1
                self._resolve(cmd.loop, _set_exception, cmd.future, exc)
                return
            self._counters.requests_added += 1
            if self._resolve(cmd.loop, _set_result, cmd.future, rid):
                self._streams[rid] = _Stream(cmd.loop, cmd.queue)
            else:
                eng.abort(rid)
        elif isinstance(cmd, _Abort):
            stream = self._streams.pop(cmd.request_id, None)
            if eng.abort(cmd.request_id):
                self._counters.requests_aborted += 1
                if stream is not None:
                    try:
                        stream.loop.call_soon_threadsafe(
                            stream.queue.put_nowait,
                            RequestFailure(cmd.request_id, RequestAborted(f"request {cmd.request_id} aborted")),
                        )
                    except RuntimeError:
                        pass
            self._snapshot(force=True)
        elif isinstance(cmd, _Call):
            try:
                result = cmd.fn(eng)
            except Exception as exc:
                self._resolve(cmd.loop, _set_exception, cmd.future, exc)
            else:
                self._resolve(cmd.loop, _set_result, cmd.future, result)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            for o in out.outputs:  # the engine keeps appending to these lists
                if o.logprobs is not None:
                    o.logprobs = list(o.logprobs)
            if out.prompt_logprobs is not None:
                out.prompt_logprobs = list(out.prompt_logprobs)
            if out.finished:
                del self._streams[out.request_id]
                self._counters.requests_finished += 1
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # loop closed: abort its requests
                for _, out in items:
                    self._streams.pop(out.request_id, None)
                    self.engine.abort(out.request_id)

    def _fail_all(self, exc: BaseException, abort: bool = True) -> None:
        streams, self._streams = self._streams, {}
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for rid, stream in streams.items():
            if abort:
                try:
                    self.engine.abort(rid)
                except Exception:  # pragma: no cover - defensive
                    log.exception("abort of %s failed", rid)
            self._counters.requests_failed += 1
            by_loop.setdefault(stream.loop, []).append((stream.queue, RequestFailure(rid, exc)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass
