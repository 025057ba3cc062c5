"""AsyncEngine: one engine thread, asyncio callers, aborts free KV blocks, errors propagate."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llmcore import ConfigError, RequestError, SamplingParams
from llmcore.engine.async_engine import AsyncEngine, EngineDeadError, RequestAborted

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def aengine(tiny_model):
    from llmcore.engine.engine import Engine

    eng = AsyncEngine(Engine(model=str(tiny_model), dtype="float32", device="cpu", max_model_len=256,
                             progress=False), name="tiny")
    yield eng
    eng.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def wait_idle(aeng: AsyncEngine) -> dict:
    for _ in range(200):
        s = await aeng.exact_stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_streams"] == 0:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {s}")


def test_generate_streams_cumulative_outputs(aengine):
    async def main():
        outs = [o async for o in aengine.generate("Hello there", SamplingParams(max_tokens=6, temperature=0))]
        return outs

    outs = run(main())
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    toks = [len(o.outputs[0].token_ids) for o in outs]
    assert toks == sorted(toks) and toks[-1] == 6
    assert outs[-1].outputs[0].finish_reason == "length"


def test_matches_the_synchronous_engine(aengine, tiny_model):
    from llmcore.engine.engine import Engine

    sync = Engine(model=str(tiny_model), dtype="float32", device="cpu", max_model_len=256, progress=False)
    params = SamplingParams(max_tokens=8, temperature=0)
    want = sync.generate(["The capital of France", "One two three"], params)

    async def main():
        async def one(p):
            last = None
            async for o in aengine.generate(p, params):
                last = o
            return last

        return await asyncio.gather(one("The capital of France"), one("One two three"))

    got = run(main())
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in want]


def test_many_concurrent_requests_are_batched(aengine):
    async def main():
        before = (await aengine.exact_stats())["steps"]

        async def one(i):
            n = 0
            async for o in aengine.generate(f"request {i}", SamplingParams(max_tokens=5, temperature=0.8, seed=i)):
                n = len(o.outputs[0].token_ids)
            return n

        res = await asyncio.gather(*(one(i) for i in range(24)))
        after = (await aengine.exact_stats())["steps"]
        return res, after - before

    res, steps = run(main())
    assert res == [5] * 24
    assert steps < 24 * 5  # continuous batching: far fewer steps than tokens


def test_add_request_errors_propagate_unchanged(aengine):
    async def main():
        with pytest.raises(RequestError) as ei:
            async for _ in aengine.generate([], SamplingParams(max_tokens=2)):
                pass
        assert ei.value.option == "prompt_token_ids"
        with pytest.raises(RequestError) as ei:
            async for _ in aengine.generate([1] * 300, SamplingParams(max_tokens=2)):
                pass
        assert ei.value.option == "prompt"

        def bad_prepare(engine):
            raise ConfigError("messages", "x", "is broken")

        with pytest.raises(ConfigError) as ei:
            async for _ in aengine.generate(prepare=bad_prepare):
                pass
        assert ei.value.option == "messages"
        # duplicate request ids are refused while the first runs
        agen = aengine.generate("hi", SamplingParams(max_tokens=250, n=8, ignore_eos=True), request_id="dup")
        await agen.__anext__()
        with pytest.raises(RequestError):
            async for _ in aengine.generate("hi", SamplingParams(max_tokens=2), request_id="dup"):
                pass
        await agen.aclose()

    run(main())
    run(wait_idle(aengine))


def test_breaking_out_aborts_and_frees_kv_blocks(aengine):
    async def main():
        agen = aengine.generate("a long one", SamplingParams(max_tokens=250, n=8, ignore_eos=True))
        async for o in agen:
            if len(o.outputs[0].token_ids) >= 3:
                break
        await agen.aclose()
        return await wait_idle(aengine)

    s = run(main())
    assert s["kv_blocks_used"] == 0
    assert s["requests_aborted"] >= 1


def test_cancelling_the_task_aborts(aengine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in aengine.generate("cancel me", SamplingParams(max_tokens=250, n=8, ignore_eos=True)):
                started.set()

        t = asyncio.create_task(consume())
        await started.wait()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        return await wait_idle(aengine)

    assert run(main())["kv_blocks_used"] == 0


def test_abort_from_elsewhere_ends_the_iterator(aengine):
    async def main():
        agen = aengine.generate("x", SamplingParams(max_tokens=250, n=8, ignore_eos=True), request_id="to-abort")
        await agen.__anext__()
        aengine.abort("to-abort")
        with pytest.raises(RequestAborted):
            async for _ in agen:
                pass

    run(main())


def test_engine_calls_happen_on_the_engine_thread(aengine):
    async def main():
        name = await aengine.call(lambda e: threading.current_thread().name)
        vec = await aengine.embed("hello")
        return name, vec

    name, vec = run(main())
    assert name == "llmcore-engine-tiny"
    assert len(vec) == 64


def test_shutdown_fails_running_requests(tiny_model):
    from llmcore.engine.engine import Engine

    aeng = AsyncEngine(Engine(model=str(tiny_model), dtype="float32", device="cpu", max_model_len=256,
                              progress=False))

    async def main():
        agen = aeng.generate("x", SamplingParams(max_tokens=250, n=8, ignore_eos=True))
        await agen.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, aeng.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass
        with pytest.raises(EngineDeadError):
            async for _ in aeng.generate("y", SamplingParams(max_tokens=2)):
                pass

    run(main())
    assert not aeng.is_running


def test_a_slow_reader_gets_the_latest_output_not_a_backlog(aengine):
    async def main():
        agen = aengine.generate("slow reader", SamplingParams(max_tokens=40, temperature=0))
        first = await agen.__anext__()
        await asyncio.sleep(0)  # let the engine run ahead while nobody reads
        while (await aengine.exact_stats())["num_streams"]:
            await asyncio.sleep(0.01)
        rest = [o async for o in agen]
        return first, rest

    first, rest = run(main())
    assert len(rest) == 1 and rest[0].finished  # one cumulative output, not 39 queued ones
    assert rest[0].outputs[0].token_ids[: len(first.outputs[0].token_ids)] == first.outputs[0].token_ids
    assert len(rest[0].outputs[0].token_ids) == 40
