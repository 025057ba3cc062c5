"""CPU compiled mode: cold compile vs warm start, and static-slot serving vs the dynamic engine.

Run from the repository root (takes ~10 minutes on a 2-core machine)::

    python benchmarks/compile_bench.py [--batch-size 8] [--max-seq-len 256] [--seq-buckets 64]
                                       [--dtype float32] [--prompts 8] [--max-tokens 64]

Model: the embedded SmolLM2-135M-Instruct (``Engine()``'s default). Phases:

1. **cold compile**: ``python -m llmcore.compiled.cli --device cpu ...`` into an empty
   compile cache, with an empty ``TORCHINDUCTOR_CACHE_DIR`` so Inductor's own
   caches do not help (what a fresh machine pays). Wall time of the process.
2. **cache hit**: the same command again (a new process): wall time.
3. **warm start**: a new process that imports llmcore, builds
   ``Engine(compiled=KEY)`` and generates one token: wall time of the process,
   plus the time inside it to build the engine. The dynamic engine's start
   (``Engine(model=...)``, eager torch) is measured the same way for reference.
4. **throughput**: in this process, ``--prompts`` chat prompts x ``--max-tokens``
   greedy tokens (``ignore_eos``) through ``Engine(compiled=KEY)`` and through the
   dynamic engine (same model, dtype, threads); best of ``--repeats`` timed runs
   after one warm-up; and whether the greedy tokens are identical.

Prints a table with the machine (CPU, cores, load average), the model, the
settings and the ratios; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.bench import machine  # noqa: E402  (no torch at import)
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three fruits that are red.",
    "How do I boil an egg?",
    "Tell me a fun fact about octopuses.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a name for a friendly robot.",
    "What does HTTP stand for?",
    "Summarize the plot of Cinderella in one sentence.",
    "Suggest a healthy breakfast.",
]

WARM_START = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from llmcore import Engine, SamplingParams
t1 = time.perf_counter()
kw = json.loads(sys.argv[1])
engine = Engine(progress=False, **kw)
t2 = time.perf_counter()
engine.generate("Hello", SamplingParams(max_tokens=1, temperature=0))
t3 = time.perf_counter()
print("RESULT " + json.dumps({"import": t1 - t0, "engine": t2 - t1, "first_token": t3 - t2}))
"""


def load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def result_line(stdout: str) -> dict:
    for line in stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no result in: {stdout[-500:]}")


def throughput(engine, prompts, params, repeats: int) -> tuple[float, list]:
    engine.generate(prompts[:2], type(params)(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    best, outs = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        best = min(best, time.perf_counter() - t0)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / best, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--seq-buckets", default="64")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both engines (default: all cores; use 1 on a shared machine, "
                         "where OpenMP barriers across busy cores are very slow)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="llmcore-compile-bench-"))
    env = dict(os.environ, LLMCORE_CACHE_DIR=str(work / "cache"), TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"),
               PYTHONWARNINGS="ignore")
    env.pop("LLMCORE_SHARED_CACHE_DIR", None)
    os.environ.update(LLMCORE_CACHE_DIR=env["LLMCORE_CACHE_DIR"])
    compile_cmd = [sys.executable, "-m", "llmcore.compiled.cli", "--device", "cpu", "--batch-size",
                   str(args.batch_size), "--max-seq-len", str(args.max_seq_len), "--dtype", args.dtype,
                   "--json", "--quiet"]
    if args.seq_buckets:
        compile_cmd += ["--seq-buckets", args.seq_buckets]
    load_before = load()

    print("cold compile ...", file=sys.stderr, flush=True)
    cold, out = run(compile_cmd, env)
    compiled = result_line(out)
    assert compiled["hit"] is False, compiled
    key = compiled["key"]
    print("cache hit ...", file=sys.stderr, flush=True)
    hit, out = run(compile_cmd, env)
    assert result_line(out)["hit"] is True

    print("warm start ...", file=sys.stderr, flush=True)
    threads = {"num_threads": args.threads} if args.threads else {}
    warm_proc, out = run([sys.executable, "-c", WARM_START, json.dumps({"compiled": key[:16], **threads})], env)
    warm = result_line(out)
    dyn_kw = {"device": "cpu", "dtype": args.dtype, "max_num_seqs": args.batch_size,
              "max_model_len": args.max_seq_len, **threads}
    dyn_proc, out = run([sys.executable, "-c", WARM_START, json.dumps(dyn_kw)], env)
    dyn_start = result_line(out)

    print("throughput ...", file=sys.stderr, flush=True)
    from llmcore import Engine, SamplingParams

    prompts = [p for _, p in zip(range(args.prompts), PROMPTS * 4)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    static = Engine(compiled=key[:16], progress=False, **threads)
    chat = [static.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    static_tps, static_tokens = throughput(static, chat, params, args.repeats)
    del static
    dynamic = Engine(progress=False, **dyn_kw)
    dyn_tps, dyn_tokens = throughput(dynamic, chat, params, args.repeats)
    same = sum(a == b for a, b in zip(static_tokens, dyn_tokens))

    res = {
        "machine": machine(), "load_avg_before": load_before, "load_avg_after": load(),
        "torch": __import__("torch").__version__, "model": "SmolLM2-135M-Instruct (embedded)",
        "settings": {"batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
                     "seq_buckets": compiled["plan"]["seq_buckets"],
                     "batch_buckets": compiled["plan"]["batch_buckets"], "dtype": args.dtype,
                     "threads": __import__("torch").get_num_threads(), "prompts": len(prompts),
                     "max_tokens": args.max_tokens},
        "key": key[:16], "entry_bytes": compiled["size_bytes"],
        "cold_compile_process_s": cold, "cold_compile_in_cache_s": compiled["seconds"],
        "cache_hit_process_s": hit,
        "warm_start_process_s": warm_proc, "warm_start_engine_s": warm["engine"],
        "warm_start_first_token_s": warm["first_token"],
        "dynamic_start_process_s": dyn_proc, "dynamic_start_engine_s": dyn_start["engine"],
        "dynamic_start_first_token_s": dyn_start["first_token"],
        "static_tok_s": static_tps, "dynamic_tok_s": dyn_tps, "greedy_identical": f"{same}/{len(prompts)}",
    }
    s = res["settings"]
    rows = [
        ("machine", res["machine"] + f" (load avg {load_before} before, {res['load_avg_after']} after)"),
        ("model", res["model"] + f", torch {res['torch']}"),
        ("settings", f"--batch-size {s['batch_size']} (decode buckets {s['batch_buckets']}) --max-seq-len "
                     f"{s['max_seq_len']} (prefill buckets {s['seq_buckets']}) --dtype {s['dtype']}, "
                     f"{s['threads']} threads"),
        ("entry", f"{res['key']} ({res['entry_bytes'] / 2**20:.1f} MiB, graphs only; weights from the model)"),
        ("cold compile (process)", f"{cold:.1f} s  (compile inside: {compiled['seconds']:.1f} s)"),
        ("cache hit (process)", f"{hit:.2f} s"),
        ("warm start (process)", f"{warm_proc:.2f} s  (import {warm['import']:.2f} + Engine {warm['engine']:.2f}"
                                 f" + first token {warm['first_token']:.2f})"),
        ("  ratio cold/warm", f"{cold / warm_proc:.1f}x (process),  "
                              f"{compiled['seconds'] / (warm['engine'] + warm['first_token']):.1f}x (in-process)"),
        ("dynamic start (process)", f"{dyn_proc:.2f} s  (import {dyn_start['import']:.2f} + Engine "
                                    f"{dyn_start['engine']:.2f} + first token {dyn_start['first_token']:.2f})"),
        (f"throughput {len(prompts)}x{args.max_tokens}", f"static {static_tps:.1f} tok/s, dynamic {dyn_tps:.1f} "
                                                        f"tok/s, ratio {static_tps / dyn_tps:.2f}x"),
        ("greedy identical", res["greedy_identical"]),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
