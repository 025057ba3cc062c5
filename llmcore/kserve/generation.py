"""One text-generation request on a served model, under the server's rules.

The same rules as the OpenAI routes: an admission slot per request (past ``max_num_seqs +
max_queue`` the answer is UNAVAILABLE / 503), the model's request timeout, the shared Prometheus
series (time to first token, inter-token latency, tokens, end-to-end latency), and an abort that
frees the KV blocks as soon as the caller stops reading (client gone, stream cancelled, error).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from llmcore.engine.async_engine import EngineDeadError, OutputQueue, RequestAborted, RequestFailure
from llmcore.errors import ConfigError
from llmcore.kserve.errors import KServeError, from_status, invalid
from llmcore.kserve.registry import Served
from llmcore.outputs import RequestOutput
from llmcore.sampling_params import SamplingParams


def _request_error(exc: ConfigError) -> KServeError:
    field = "text_input" if exc.option in ("prompt", "prompt_token_ids") else f"sampling_parameters.{exc.option}"
    msg = str(exc)
    if msg.startswith(exc.option):
        msg = msg[len(exc.option):]
    return invalid(f"{field}{msg}")


def _failure(err: BaseException, model: str) -> KServeError:
    if isinstance(err, EngineDeadError):
        return KServeError("unavailable", f"model {model!r} stopped while serving the request (unloaded, or its "
                                          f"engine failed): {err}")
    if isinstance(err, RequestAborted):
        return KServeError("unavailable", "the request was aborted")
    return KServeError("internal", f"generation failed: {type(err).__name__}: {err}")


class _Account:
    """Feeds the shared metrics from one request's cumulative outputs."""

    def __init__(self, metrics: Any, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.arrival = self.last = time.monotonic()
        self.tokens: int | None = None

    def add(self, out: RequestOutput) -> None:
        m, now = self.metrics, time.monotonic()
        ntok = sum(len(o.token_ids) for o in out.outputs)
        if self.tokens is None:
            m.prompt_tokens.labels(self.model).inc(len(out.prompt_token_ids))
            self.tokens = 0
        if ntok > self.tokens:
            hist = m.ttft if self.tokens == 0 else m.itl
            hist.labels(self.model).observe(now - (self.arrival if self.tokens == 0 else self.last))
            m.generation_tokens.labels(self.model).inc(ntok - self.tokens)
            self.tokens, self.last = ntok, now
        if out.finished:
            m.e2e.labels(self.model).observe(now - self.arrival)


async def generate(served: Served, metrics: Any, prompt: str, params: SamplingParams) -> AsyncIterator[RequestOutput]:
    """Yield the request's cumulative outputs until it finishes; leaving early aborts it."""
    try:
        served.admit(1, "text_input")
    except KServeError:
        raise
    except Exception as exc:  # the shared admission check speaks HTTP statuses
        status = getattr(exc, "status", None)
        if status is None:
            raise
        raise from_status(status, getattr(exc, "message", str(exc)), getattr(exc, "headers", None)) from None
    engine = served.engine
    rid = f"kserve-{uuid.uuid4().hex}"  # clients' ids may repeat; theirs is echoed, this one is the engine's
    account = _Account(metrics, served.name)
    timeout = served.request_timeout
    deadline = None if timeout is None else account.arrival + timeout
    queue = OutputQueue()
    finished = False
    try:
        try:
            await engine.add_request(prompt, params, rid, queue=queue)
        except ConfigError as exc:
            finished = True  # never started
            raise _request_error(exc) from None
        except EngineDeadError as exc:
            finished = True
            raise _failure(exc, served.name) from None
        while True:
            if deadline is None:
                item = await queue.get()
            else:
                try:
                    item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    raise KServeError("timeout", f"the request passed the model's request timeout ({timeout:g} s) "
                                                 "and was aborted") from None
            if isinstance(item, RequestFailure):
                finished = True
                raise _failure(item.error, served.name)
            account.add(item)
            if item.finished:
                finished = True
            yield item
            if finished:
                return
    finally:
        if not finished:
            engine.abort(rid)
        served.in_flight -= 1
