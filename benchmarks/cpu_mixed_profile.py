"""Where the time of the mixed CPU workload goes (issue #21, step 1): W3 of ../shared/PEERS.md.

64 requests, prompt lengths uniform in 20..400 and output lengths in 16..256 (``random.Random(0)``),
random ordinary tokens of the SmolLM2 vocabulary, greedy, ``ignore_eos``, all queued at once.
Reports, for one run: useful tok/s; host seconds per engine phase (schedule, launch = the
runner's execute, output); the execute time split by step kind (steps with prompt tokens vs
decode-only steps) with the tokens each computed; and a torch-profiler table of the operators
(GEMMs, attention, norms, sampling) over the whole run.

    python benchmarks/cpu_mixed_profile.py                 # embedded SmolLM2, the device's default dtype
    python benchmarks/cpu_mixed_profile.py --no-torch-profile --dtype float32
    python benchmarks/cpu_mixed_profile.py --no-torch-profile --torch-decode-baseline   # + the same W3 without
                                                                                       # the native step, same process
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from llmcore import Engine, SamplingParams
from llmcore.bench import machine


def workload(n: int = 64, seed: int = 0):
    rng = random.Random(seed)
    return [([300 + rng.randrange(20000) for _ in range(rng.randint(20, 400))], rng.randint(16, 256))
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--no-torch-profile", action="store_true")
    ap.add_argument("--torch-decode-baseline", action="store_true",
                    help="afterwards run the same requests on an engine without the native decode step")
    args = ap.parse_args()
    eng = Engine(model=args.model, device="cpu", dtype=args.dtype, progress=False, max_num_seqs=64,
                 num_threads=args.threads)
    reqs = workload(args.requests)
    eng.generate([reqs[0][0][:32]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    split = {"prompt": [0.0, 0, 0], "decode": [0.0, 0, 0]}  # seconds, steps, tokens
    execute = eng.runner.execute

    def timed(batch):
        t0 = time.perf_counter()
        out = execute(batch)
        kind = "prompt" if any(len(s.token_ids) > 1 for s in batch.seqs) else "decode"
        rec = split[kind]
        rec[0] += time.perf_counter() - t0
        rec[1] += 1
        rec[2] += sum(len(s.token_ids) for s in batch.seqs)
        return out

    eng.runner.execute = timed
    phases = eng.measure_phases()
    prof = None
    if not args.no_torch_profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
    t0 = time.perf_counter()
    outs = eng.generate([p for p, _ in reqs],
                        [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for _, o in reqs])
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
    useful = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; device {eng.probe.name}, "
          f"dtype {eng.dtype}; decode step: {type(eng.runner.decode_graph).__name__ if eng.runner.decode_graph else 'torch path'}")
    print(f"W3: {len(reqs)} requests, {sum(len(p) for p, _ in reqs)} prompt tokens, {useful} generated; "
          f"{wall:.1f} s, {useful / wall:.1f} useful tok/s{' (under the torch profiler)' if prof else ''}")
    print("\n| phase | seconds | share |\n|---|---|---|")
    for k in ("schedule", "launch", "wait", "output"):
        print(f"| {k}{' (runner.execute)' if k == 'launch' else ''} | {phases[k]:.2f} | {phases[k] / wall:.0%} |")
    print("\n| steps | count | tokens computed | execute seconds | ms per step | share of the run |\n|---|---|---|---|---|---|")
    for kind, (sec, steps, toks) in split.items():
        print(f"| {'with prompt tokens (prefill, chunked, mixed)' if kind == 'prompt' else 'decode only'} | {steps} | "
              f"{toks} | {sec:.2f} | {1e3 * sec / max(steps, 1):.1f} | {sec / wall:.0%} |")
    if prof is not None:
        print()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))
    if args.torch_decode_baseline:
        del eng
        base = Engine(model=args.model, device="cpu", dtype=args.dtype, progress=False, max_num_seqs=64,
                      num_threads=args.threads, native_decode=False)
        base.generate([reqs[0][0][:32]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        outs = base.generate([p for p, _ in reqs],
                             [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for _, o in reqs])
        base_wall = time.perf_counter() - t0
        base_useful = sum(len(o.outputs[0].token_ids) for o in outs)
        print("\n| W3, same process | seconds | useful tok/s | ratio |\n|---|---|---|---|")
        print(f"| torch path decode (baseline) | {base_wall:.1f} | {base_useful / base_wall:.1f} | 1.00x |")
        print(f"| this run's decode step | {wall:.1f} | {useful / wall:.1f} | "
              f"{(useful / wall) / (base_useful / base_wall):.2f}x |")


if __name__ == "__main__":
    main()
