"""The overlapped engine core gives exactly the synchronous engine's outputs.

``async_scheduling=True`` on the CPU runs the overlapped loop (placeholders fed forward, stops
found one step late, extra tokens discarded) over the CPU runner's execute(); every output
must equal the synchronous loop's, and aborts must free KV blocks at once.
"""

from __future__ import annotations

import pytest

from llmcore import Engine, SamplingParams


def make(model, mode, thread=False, **kw):
    kw.setdefault("num_kv_blocks", 64)
    return Engine(model=str(model), device="cpu", dtype="float32", progress=False, async_scheduling=mode,
                  output_thread=thread, **kw)


def outputs(engine, prompts, params):
    return [[(o.text, o.token_ids, o.finish_reason, o.stop_reason, o.logprobs, round(o.cumulative_logprob, 4))
             for o in r.outputs] for r in engine.generate(prompts, params)]


# (overlapped loop, output thread): each against the synchronous loop with inline outputs
VARIANTS = [(True, False), (True, True), (False, True)]


@pytest.fixture(scope="module")
def engines(tiny_llama):
    made = {(False, False): make(tiny_llama, False)}
    for v in VARIANTS:
        made[v] = make(tiny_llama, *v)
    yield made
    for e in made.values():
        e.shutdown()


@pytest.fixture(params=VARIANTS, ids=lambda v: ("overlap" if v[0] else "sync") + ("+thread" if v[1] else ""))
def pair(engines, request):
    return engines[(False, False)], engines[request.param]


def test_engine_uses_the_overlapped_loop_and_thread_only_when_asked(engines):
    for (ovl, thread), e in engines.items():
        assert (e._launch is not None) == ovl and e.output_thread == thread


def test_mixed_requests_match_the_synchronous_engine(pair):
    prompts = [list(range(3 + i, 3 + i + 5 + 7 * i)) for i in range(8)]
    params = [
        SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),  # one token: never re-scheduled
        SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, n=3, ignore_eos=True),  # fork: a barrier step
        SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=11, temperature=0, min_tokens=4),
        SamplingParams(max_tokens=7, temperature=0, prompt_logprobs=1, ignore_eos=True),
    ]
    sync, ovl = pair
    assert outputs(ovl, prompts, params) == outputs(sync, prompts, params)
    assert ovl.stats()["kv_blocks_used"] == 0


def test_stop_found_one_step_late_discards_the_extra_token(pair):
    sync, ovl = pair
    prompt = list(range(40, 52))
    free = sync.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    toks = free.outputs[0].token_ids
    # stop on the 4th generated token (id) and on text ending at the 3rd one
    stop_id = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[toks[3]], ignore_eos=True)
    text3 = sync.tokenizer.decode(toks[:3])
    stop_str = SamplingParams(max_tokens=10, temperature=0, stop=[text3[-2:]], ignore_eos=True) if len(text3.strip()) > 2 else stop_id
    for p in (stop_id, stop_str):
        a, b = outputs(sync, [prompt], p), outputs(ovl, [prompt], p)
        assert a == b
        assert len(b[0][0][1]) < 10
    assert ovl.stats()["kv_blocks_used"] == 0


def test_preemption_under_a_small_cache_matches(tiny_llama):
    prompts = [list(range(10 + 20 * i, 30 + 20 * i)) for i in range(6)]
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    sync = make(tiny_llama, False, num_kv_blocks=14)
    ovl = make(tiny_llama, True, num_kv_blocks=14)
    assert outputs(ovl, prompts, p) == outputs(sync, prompts, p)
    assert ovl.stats()["num_preemptions"] > 0
    assert ovl.stats()["kv_blocks_used"] == 0


def test_streams_match_and_deltas_add_up(pair):
    sync, ovl = pair
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = [(d.text, d.token_ids, d.finish_reason) for d in sync.stream(list(range(5, 20)), p)]
    b = [(d.text, d.token_ids, d.finish_reason) for d in ovl.stream(list(range(5, 20)), p)]
    assert a == b


@pytest.mark.parametrize("thread,count", [(False, 1000), (True, 300)], ids=["inline", "thread"])
def test_a_thousand_aborted_streams_leave_no_kv_blocks(tiny_llama, thread, count):
    engine = make(tiny_llama, True, thread, num_kv_blocks=256, max_num_seqs=32)
    p = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    for i in range(count):
        it = engine.stream(list(range(1 + i % 50, 9 + i % 50)), p)
        next(it)
        if i % 3 == 0:
            next(it)  # some aborted with a step in flight
        it.close()
        assert engine.stats()["kv_blocks_used"] == 0
    assert not engine.has_unfinished_requests()
    # and the engine still generates correctly afterwards
    sync = make(tiny_llama, False)
    q = list(range(60, 70))
    assert outputs(engine, [q], p) == outputs(sync, [q], p)


def test_output_thread_failure_is_raised_on_the_engine_thread(tiny_llama, monkeypatch):
    engine = make(tiny_llama, True, True)

    def broken(*a, **k):
        raise ValueError("detokenizer broke")

    monkeypatch.setattr(engine.out, "process", broken)
    with pytest.raises(RuntimeError, match="output thread failed") as info:
        engine.generate([list(range(3, 9))], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert isinstance(info.value.__cause__, ValueError)
    engine.shutdown()


def test_final_only_requests_report_once(tiny_llama):
    engine = make(tiny_llama, False)
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    rid = engine.add_request(list(range(3, 9)), p, final_only=True)
    other = engine.add_request(list(range(3, 9)), p)
    seen = []
    while engine.has_unfinished_requests():
        seen += [(o.request_id, o.finished) for o in engine.step()]
    assert [x for x in seen if x[0] == rid] == [(rid, True)]
    assert len([x for x in seen if x[0] == other]) == 5


def test_output_builder_matches_the_output_dataclasses_field_order():
    """OutputProcessor.build creates CompletionOutput and RequestOutput positionally (per
    request per step while streaming): their field order is pinned here."""
    import dataclasses

    from llmcore.outputs import CompletionOutput, RequestOutput

    assert [f.name for f in dataclasses.fields(CompletionOutput)] == [
        "index", "text", "token_ids", "finish_reason", "stop_reason", "logprobs", "cumulative_logprob"]
    assert [f.name for f in dataclasses.fields(RequestOutput)] == [
        "request_id", "prompt", "prompt_token_ids", "outputs", "finished", "num_cached_tokens",
        "prompt_logprobs", "metrics"]
