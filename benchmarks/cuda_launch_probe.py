"""Where does an overlapped CUDA step wait? A diagnostic for issue #15, not a benchmark table.

On an H100 the overlapped engine loop (``CudaModelRunner.launch``) spent ~8.7 ms a step inside
its launches while the synchronous loop's whole step took ~6 ms, with no synchronizing call
that CUDA's sync-debug mode could see. This probe separates the candidates, in one process:

1. ``replay``: host time of ``CUDAGraph.replay()`` for the decode graphs (batch 1, 64, 256)
   while the stream is still busy (a ``torch.cuda._sleep`` in front; then back-to-back replays
   of one instance, then of the two alternated instances). A launch that returns in
   microseconds is asynchronous; one that takes about a step waits for the GPU.
2. a trivial graph (one elementwise kernel, 64 nodes) under the same test: the driver's own
   behaviour, independent of llmcore's kernels.
3. ``engine``: a decode-heavy workload through ``Engine.generate`` in the synchronous and the
   overlapped loop (same engine, same process), with the engine's phase seconds.
4. ``mixed``: cuda_bench.py's 256-request workload, both loops, every launch timed and split by
   part, the slowest listed; then a window of its steps under ``torch.profiler`` listing the
   calls (CUDA runtime included) by host time.

Run it twice to A/B programmatic dependent launch: ``LLMCORE_CUDA_PDL=0`` turns it off.

    bash benchmarks/cuda_gpu_run.sh probe            # or: python3 benchmarks/cuda_launch_probe.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def say(*a) -> None:
    print(*a, flush=True)


def probe_replays(torch, graphs: dict, label: str, sleep_cycles: int) -> None:
    """Host microseconds per replay() while the stream is busy."""
    for b, pair in graphs.items():
        g1, g2 = pair
        g1.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            g1.replay()
        torch.cuda.synchronize()
        gpu_ms = (time.perf_counter() - t) / 10 * 1e3
        rows = []
        for alt in (False, True):
            if alt and g2 is None:
                continue
            torch.cuda._sleep(sleep_cycles)  # keeps the stream busy for tens of ms
            host = []
            for i in range(6):
                g = g2 if alt and i % 2 else g1
                t = time.perf_counter()
                g.replay()
                host.append((time.perf_counter() - t) * 1e6)
            t = time.perf_counter()
            torch.cuda.synchronize()
            tail_ms = (time.perf_counter() - t) * 1e3
            rows.append(f"{'alternating' if alt else 'one instance'}: replay() host us "
                        f"{[round(x) for x in host]}, then {tail_ms:.1f} ms to drain")
        say(f"[{label}] batch {b}: {gpu_ms:.3f} ms a replay (synchronized); " + "; ".join(rows))


def trivial_graphs(torch):
    x = torch.zeros(1 << 20, device="cuda")
    out = []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x.add_(1)
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for _ in range(64):
                    x.add_(1)
        torch.cuda.current_stream().wait_stream(s)
        out.append(g)
    torch.cuda.synchronize()
    return {"64 adds": tuple(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/llmcore-bench/llama1b-bf16")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    import torch

    from cuda_bench import phase_build
    from llmcore import SamplingParams
    from llmcore.engine.engine import Engine

    env = {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "PYTORCH_", "LLMCORE_", "TORCH_"))}
    say("env:", env)
    say("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
    phase_build(types.SimpleNamespace(model_dir=args.model_dir))
    eng = Engine(model=args.model_dir, device="cuda", dtype="bfloat16", max_num_seqs=256, max_model_len=2560,
                 async_scheduling=True, gpu_memory_utilization=0.6, progress=False)
    r = eng.runner
    say(f"pdl={r.fused.pdl} overlap={r.overlap} buckets={sorted(r.graphs)}")
    clock = torch.cuda.get_device_properties(0).clock_rate if hasattr(torch.cuda.get_device_properties(0), "clock_rate") else 1_700_000
    cycles = int(clock * 1e3 * 0.03)  # ~30 ms
    probe_replays(torch, trivial_graphs(torch), "trivial", cycles)
    alt = getattr(r, "graphs_alt", {})  # second instances, captured by earlier versions of the runner
    probe_replays(torch, {b: (r.graphs[b].graph, alt[b].graph if b in alt else None)
                          for b in (1, 64, 256) if b in r.graphs}, "decode", cycles)

    g = torch.Generator().manual_seed(0)
    vocab = r.config.vocab_size
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
    sp = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    launch = r.launch
    eng.generate(prompts[:8], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    results = {}
    for rnd in range(2):
        for mode in ("sync", "overlap"):
            eng._launch = launch if mode == "overlap" else None
            phases = eng.measure_phases()
            before = dict(r.stats)
            steps0 = eng._steps
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = eng.generate(prompts, sp)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            ntok = sum(len(o.outputs[0].token_ids) for o in outs)
            steps = eng._steps - steps0
            st = {k: r.stats[k] - before.get(k, 0) for k in r.stats}
            results.setdefault(mode, []).append(ntok / wall)
            say(f"[engine round {rnd}] {mode}: {ntok / wall:,.0f} tok/s, {wall:.2f} s, {steps} steps "
                f"({wall / steps * 1e3:.2f} ms/step); phases s " +
                " ".join(f"{k}={v:.2f}" for k, v in phases.items()) + f"; stats {st}")
    say("engine medians tok/s:", {k: round(statistics.median(v)) for k, v in results.items()})

    mixed_workload(torch, eng, launch, SamplingParams)
    eng.shutdown()


PROF_FROM, PROF_TO = 400, 440


def mixed_workload(torch, eng, launch, SamplingParams) -> None:
    """cuda_bench.py's 256-request workload (prompts and outputs 100..1024): each launch timed,
    split by part (``CudaModelRunner.launch_s``), the slowest listed; then a window of its
    decode steps under torch.profiler."""
    from cuda_bench import workload

    r = eng.runner
    reqs = workload(r.config.vocab_size)
    records = []

    def timed(batch):
        before = dict(r.launch_s)
        eager0 = r.stats["eager_steps"]
        t = time.perf_counter()
        h = launch(batch)
        dt = time.perf_counter() - t
        records.append((dt, len(batch.seqs), r.stats["eager_steps"] != eager0,
                        {k: round((v - before[k]) * 1e3, 2) for k, v in r.launch_s.items() if v != before[k]}))
        return h

    def run(mode, prof_window=None):
        for ids, o in reqs:
            eng.add_request(ids, SamplingParams(max_tokens=o, temperature=0, ignore_eos=True), final_only=True)
        eng._launch = timed if mode == "overlap" else None
        phases = eng.measure_phases()
        l0 = dict(r.launch_s)
        records.clear()
        prof = None
        k = 0
        torch.cuda.synchronize()
        t = time.perf_counter()
        while eng.has_unfinished_requests():
            if prof_window and k == prof_window[0]:
                from torch.profiler import ProfilerActivity, profile

                prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                prof.__enter__()
            eng.step()
            k += 1
            if prof is not None and k == prof_window[1]:
                torch.cuda.synchronize()
                prof.__exit__(None, None, None)
                prof_done, prof = prof, None
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        ntok = sum(o for _, o in reqs)
        say(f"[mixed {mode}{' profiled' if prof_window else ''}] {ntok / wall:,.0f} tok/s, {wall:.2f} s, {k} steps; "
            "phases s " + " ".join(f"{a}={b:.2f}" for a, b in phases.items()) +
            "; launch_s " + " ".join(f"{a}={v - l0[a]:.3f}" for a, v in r.launch_s.items()))
        if records:
            for eager in (False, True):
                d = sorted(x[0] * 1e3 for x in records if x[2] == eager)
                if d:
                    say(f"  {'eager' if eager else 'graph'} launches: {len(d)}, ms p50 {d[len(d) // 2]:.2f} "
                        f"p90 {d[int(len(d) * 0.9)]:.2f} max {d[-1]:.2f} sum {sum(d) / 1e3:.2f} s")
            for dt, n, eager, parts in sorted(records, key=lambda x: -x[0])[:12]:
                say(f"  slow launch {dt * 1e3:7.2f} ms, {n} seqs, {'eager' if eager else 'graph'}: {parts}")
        if prof_window:
            ka = prof_done.key_averages()
            say(f"--- steps {prof_window[0]}..{prof_window[1]} under torch.profiler: host (self CPU) time by call")
            for e in sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]:
                say(f"{e.key[:60]:60s} calls {e.count:6d}  self cpu {e.self_cpu_time_total / 1e3:9.1f} ms  "
                    f"avg {e.self_cpu_time_total / max(e.count, 1):8.1f} us")

    run("sync")
    run("overlap")
    run("sync")
    run("overlap")
    run("overlap", prof_window=(PROF_FROM, PROF_TO))


if __name__ == "__main__":
    main()
