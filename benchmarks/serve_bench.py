"""Serving benchmark for docs/benchmarks.md (issue 6): a real `llmcore serve` process on 127.0.0.1.

Starts the server on the embedded SmolLM2-135M-Instruct (or --model), then for each concurrency
level (default 1, 8, 32, 64) keeps that many streaming chat requests in flight until
--requests (default 2 x concurrency, at least 8) have completed, and reports:

- requests/s and generated tokens/s over the level,
- time to first token (first content chunk) p50 / p99,
- inter-token latency (gap between content chunks of one stream; one chunk per engine step,
  i.e. per token for n=1) p50 / p99,
- end-to-end latency p50.

Every request asks for --max-tokens tokens with ignore_eos, so all levels generate the same
amount. The client is httpx on asyncio in this process (it shares the machine with the
server: on a small CPU the client's own cost is part of what is measured).

Usage: .venv/bin/python benchmarks/serve_bench.py [--concurrency 1 8 32 64] [--max-tokens 64]
       [--threads N] [--model M] [--url http://host:port --api-key K --served-model-name NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmcore.bench import machine

REPO = Path(__file__).resolve().parents[1]

TOPICS = ["photosynthesis", "the water cycle", "binary search", "the French revolution", "plate tectonics",
          "compound interest", "how vaccines work", "the rules of chess", "black holes", "recursion"]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "llmcore.server", "serve", "--port", "0", "--no-access-log",
           "--log-level", "warning", "--max-queue", "1024", "--served-model-name", args.served_model_name]
    if args.model:
        cmd += ["--model", args.model]
    for opt in ("device", "dtype", "threads", "max_num_seqs"):
        v = getattr(args, opt)
        if v is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(v)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = re.search(r"llmcore serve: .* at (http://\S+)", text)
        if m:
            for _ in range(100):  # uvicorn starts right after the URL line
                try:
                    httpx.get(m.group(1) + "/health", timeout=5)
                    return proc, m.group(1)
                except httpx.TransportError:
                    time.sleep(0.1)
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


async def one_request(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> dict:
    body = {
        "model": model, "stream": True, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
        "messages": [{"role": "user", "content":
                      f"Please write a detailed, friendly explanation of {TOPICS[i % len(TOPICS)]} "
                      f"for a curious student, number {i}."}],
    }
    t0 = time.perf_counter()
    first = None
    last = None
    gaps: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if not any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                continue
            now = time.perf_counter()
            tokens += 1
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "gaps": gaps, "e2e": end - t0, "chunks": tokens}


async def run_level(url: str, headers: dict, model: str, concurrency: int, total: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    results: list[dict] = []
    counter = iter(range(total))

    async def worker(client):
        for i in counter:
            results.append(await one_request(client, model, i, max_tokens))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        await one_request(client, model, 10_000, 4)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "req_s": len(results) / wall,
        "tok_s": len(results) * max_tokens / wall,
        "ttft_p50": pct([r["ttft"] for r in results], 50),
        "ttft_p99": pct([r["ttft"] for r in results], 99),
        "itl_p50": pct(gaps, 50),
        "itl_p99": pct(gaps, 99),
        "e2e_p50": statistics.median(r["e2e"] for r in results),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x concurrency, >= 8)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--served-model-name", default="bench")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--offline", action="store_true",
                    help="after the server stops, run each level's requests through the offline engine "
                         "(Engine.generate, same settings, same prompts) in this process and print served/offline")
    args = ap.parse_args()

    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        log_path = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "server.log"
        proc, url = start_server(args, log_path)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        health = httpx.get(url + "/health", timeout=30).json()
        info = health["models"].get(args.served_model_name) or next(iter(health["models"].values()))
        rows = []
        for c in args.concurrency:
            total = args.requests or max(2 * c, 8)
            row = asyncio.run(run_level(url, headers, args.served_model_name, c, total, args.max_tokens))
            rows.append(row)
            print(f"  concurrency {c}: {row['req_s']:.2f} req/s", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    import torch

    offline = run_offline(args) if args.offline else {}
    print(f"\nMachine: {machine()}; torch {torch.__version__}; load average at end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"Model: {args.model or 'embedded SmolLM2-135M-Instruct'} on {info['device']}"
          f" (max_model_len {info['max_model_len']}); server settings: "
          f"threads={args.threads or 'default'}, max_num_seqs={args.max_num_seqs or 64}, dtype={args.dtype or 'auto'}")
    print(f"Workload: streaming chat completions, {args.max_tokens} tokens each (ignore_eos, greedy), "
          f"~30-token prompts; client httpx/asyncio on the same machine\n")
    print("| concurrent streams | requests | requests/s | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) "
          "| ITL p50 (ms) | ITL p99 (ms) | e2e p50 (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.0f} | "
              f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} | "
              f"{r['itl_p99'] * 1e3:.1f} | {r['e2e_p50']:.2f} |")
    if offline:
        print("\n| concurrent streams | served tokens/s | offline engine tokens/s (same prompts, max_num_seqs = "
              "concurrency) | served / offline |\n|---:|---:|---:|---:|")
        for r in rows:
            off = offline[r["concurrency"]]
            print(f"| {r['concurrency']} | {r['tok_s']:.0f} | {off:.0f} | {r['tok_s'] / off:.2f}x |")
    return 0


def run_offline(args) -> dict[int, float]:
    """tokens/s of the offline engine on each level's prompts, as many at once as the level's streams."""
    from llmcore import Engine, SamplingParams

    kw = {k: getattr(args, k) for k in ("device", "dtype") if getattr(args, k) is not None}
    if args.threads is not None:
        kw["num_threads"] = args.threads
    eng = Engine(model=args.model, progress=False, max_num_seqs=max(args.concurrency), **kw)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    def prompt(i: int) -> str:
        return eng.apply_chat_template([{"role": "user", "content":
                                         f"Please write a detailed, friendly explanation of {TOPICS[i % len(TOPICS)]} "
                                         f"for a curious student, number {i}."}])

    eng.generate([prompt(10_000)], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    out = {}
    for c in args.concurrency:
        total = args.requests or max(2 * c, 8)
        eng.scheduler.max_num_seqs = c  # the server level keeps c streams in flight
        t0 = time.perf_counter()
        eng.generate([prompt(i) for i in range(total)], sp)
        out[c] = total * args.max_tokens / (time.perf_counter() - t0)
        print(f"  offline, {c} at once: {out[c]:.0f} tok/s", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
