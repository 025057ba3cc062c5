"""Scheduler figures for docs/benchmarks.md (issue 3), on the embedded SmolLM2, CPU.

1. Prefix caching: 32 chat requests sharing a long system prompt; prompt tokens served from
   the cache vs computed, and wall time with caching on vs off.
2. KV memory waste at peak on the 64-request workload (64 prompts x 128 new tokens).
3. Time to first token of short requests arriving while a long prompt prefills, with and
   without chunked prefill.

Usage: .venv/bin/python benchmarks/scheduler_bench.py [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from llmcore import Engine, SamplingParams
from llmcore.bench import machine, make_prompts

SYSTEM = (
    "You are a meticulous assistant for a public library. Answer questions about opening hours, "
    "membership, borrowing rules and events. Opening hours: Monday to Friday 9:00-20:00, Saturday "
    "10:00-17:00, closed on Sunday. Members may borrow up to 12 items for three weeks, renewable twice "
    "unless reserved. Late fees are 20 cents per item per day, capped at 5 euros. Membership is free "
    "for residents and 15 euros a year otherwise. Events: story time every Wednesday at 10:30, a book "
    "club on the first Thursday of each month, and coding workshops for teenagers on Saturdays. "
    "Always answer politely, concisely, and cite the rule you used."
)


def prefix_workload(engine_kw, n=32):
    rows = {}
    for caching in (True, False):
        engine = Engine(enable_prefix_caching=caching, **engine_kw)
        prompts = [engine.tokenizer.apply_chat_template([
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question {i}: can I borrow {i % 12 + 1} books?"}]) for i in range(n)]
        p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        engine.generate(prompts[:1], p)  # first request computes the shared prefix
        t0 = time.perf_counter()
        engine.generate(prompts[1:], p)
        dt = time.perf_counter() - t0
        st = engine.stats()
        total = sum(len(engine.tokenizer.encode(x)) for x in prompts)
        rows[caching] = (st["prefix_cache_hit_tokens"], total, dt)
    return rows


def waste_workload(engine_kw, n=64, new_tokens=128, block_size=16):
    engine = Engine(block_size=block_size, **engine_kw)
    prompts = make_prompts(engine.tokenizer, n)
    engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    return engine.stats()["kv_waste_at_peak"]


def ttft_workload(engine_kw, chunked: bool, long_tokens=1536, n_short=4):
    engine = Engine(enable_chunked_prefill=chunked, max_num_batched_tokens=256 if chunked else 4096,
                    enable_prefix_caching=False, **engine_kw)
    tok = engine.tokenizer
    long_prompt = (tok.encode(SYSTEM) * 20)[:long_tokens]
    shorts = [tok.encode(f"Short question {i}: what is {i} plus {i}?") for i in range(n_short)]
    p_long = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    p_short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.generate([shorts[0]], p_short)  # warm-up
    t_submit = {}
    ttft = {}
    engine.add_request(long_prompt, p_long, request_id="long")
    ids = []
    for i, s in enumerate(shorts):
        rid = engine.add_request(s, p_short, request_id=f"short{i}")
        t_submit[rid] = time.perf_counter()
        ids.append(rid)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id in t_submit and out.request_id not in ttft and out.outputs[0].token_ids:
                ttft[out.request_id] = time.perf_counter() - t_submit[out.request_id]
    return statistics.median(ttft.values()), max(ttft.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    kw = dict(progress=False, dtype=args.dtype, num_threads=args.threads, max_num_seqs=64)
    print(f"machine: {machine()}\nmodel: SmolLM2-135M-Instruct (embedded), dtype {args.dtype}\n")
    rows = prefix_workload(kw)
    hit, total, dt_on = rows[True]
    _, _, dt_off = rows[False]
    print("| prefix caching (32 requests, shared ~150-token system prompt) | value |\n|---|---:|")
    print(f"| prompt tokens served from cache | {hit} of {total} ({hit / total:.0%}) |")
    print(f"| wall time for requests 2..32, caching on / off | {dt_on:.2f} s / {dt_off:.2f} s ({dt_off / dt_on:.2f}x) |\n")
    print("| KV waste at peak (64 prompts x 128 new tokens) | value |\n|---|---:|")
    for bs in (16, 8):
        print(f"| block size {bs} | {waste_workload(kw, block_size=bs):.1%} |")
    print()
    print("| TTFT of 4 short requests behind a 1,536-token prompt | median | max |\n|---|---:|---:|")
    for chunked in (False, True):
        med, mx = ttft_workload(kw, chunked)
        label = "chunked prefill (256-token budget)" if chunked else "no chunking"
        print(f"| {label} | {med * 1000:.0f} ms | {mx * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
