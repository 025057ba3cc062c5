"""Token streaming through KServe v2 gRPC (Triton's client) vs OpenAI SSE, same server, same run.

Starts ``llmcore serve --grpc-port 0`` on the embedded SmolLM2-135M-Instruct (or --model), then for
each concurrency level (default 1, 8, 32) runs the same prompts with the same greedy settings
(--max-tokens tokens, ignore_eos) twice: as OpenAI ``/v1/completions`` SSE streams (httpx) and as
``ModelStreamInfer`` calls with ``text_input``/``stream``/``sampling_parameters`` (tritonclient.grpc.aio,
one call per request as the RBLN tutorial's client does). Prints generated tokens/s, time to
first token p50/p99 and inter-chunk latency p50 for each protocol, and the gRPC/SSE ratio.

Usage: .venv/bin/python benchmarks/grpc_vs_sse_bench.py [--concurrency 1 8 32] [--max-tokens 64]
       [--threads N] [--model M] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from llmcore.bench import machine
from serve_bench import TOPICS, pct  # the sibling benchmark's prompts and percentile

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench"


def start(args, log_path: Path) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "llmcore.server", "serve", "--host", "127.0.0.1", "--port", "0", "--grpc-port",
           "0", "--no-access-log", "--log-level", "warning", "--max-queue", "1024", "--served-model-name", MODEL_NAME]
    for opt in ("model", "device", "dtype", "threads", "max_num_seqs"):
        v = getattr(args, opt)
        if v is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(v)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        http, grpc = re.search(r" at (http://\S+)", text), re.search(r"KServe v2 gRPC at (\S+)", text)
        if http and grpc:
            return proc, http.group(1), grpc.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def prompt(i: int) -> str:
    return f"Here is a detailed, friendly explanation of {TOPICS[i % len(TOPICS)]} for student number {i}:"


async def sse_request(client: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt(i), "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    t0, stamps = time.perf_counter(), []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and any(c.get("text") for c in json.loads(line[6:]).get("choices", [])):
                stamps.append(time.perf_counter())
    return {"t0": t0, "stamps": stamps, "end": time.perf_counter()}


async def grpc_request(client, aio, i: int, max_tokens: int) -> dict:
    text = aio.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt(i).encode()], dtype=np.object_))
    stream = aio.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    params = aio.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"max_tokens": max_tokens, "temperature": 0,
                                                     "ignore_eos": True}).encode()], dtype=np.object_))

    async def gen():
        yield {"model_name": MODEL_NAME, "inputs": [text, stream, params], "request_id": str(i),
               "outputs": [aio.InferRequestedOutput("text_output")]}

    t0, stamps = time.perf_counter(), []
    async for result, error in client.stream_infer(gen()):
        if error is not None:
            raise RuntimeError(str(error))
        if any(result.as_numpy("text_output")):
            stamps.append(time.perf_counter())
    return {"t0": t0, "stamps": stamps, "end": time.perf_counter()}


async def run_level(protocol: str, http_url: str, grpc_url: str, concurrency: int, total: int,
                    max_tokens: int) -> dict:
    import tritonclient.grpc.aio as aio  # optional dependency (test extra): only this benchmark needs it

    counter = iter(range(total))
    results: list[dict] = []
    if protocol == "sse":
        client = httpx.AsyncClient(base_url=http_url, timeout=600,
                                   limits=httpx.Limits(max_connections=concurrency + 4))
        one = lambda i, n: sse_request(client, i, n)  # noqa: E731
    else:
        client = aio.InferenceServerClient(url=grpc_url)
        one = lambda i, n: grpc_request(client, aio, i, n)  # noqa: E731

    async def worker() -> None:
        for i in counter:
            results.append(await one(i, max_tokens))

    try:
        await one(10_000, 4)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await (client.aclose() if protocol == "sse" else client.close())
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"protocol": protocol, "concurrency": concurrency, "requests": len(results),
            "tok_s": len(results) * max_tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(gaps, 50)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x concurrency, >= 8)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, http_url, grpc_url = start(args, Path(tmp) / "server.log")
        try:
            rows = []
            for c in args.concurrency:
                total = args.requests or max(8, 2 * c)
                for protocol in ("sse", "grpc"):
                    rows.append(asyncio.run(run_level(protocol, http_url, grpc_url, c, total, args.max_tokens)))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"# gRPC ModelStreamInfer vs OpenAI SSE — {machine()}; model {args.model or 'SmolLM2-135M-Instruct'}, "
          f"{args.max_tokens} tokens/request, greedy, ignore_eos")
    print("| concurrency | protocol | requests | tok/s | ratio to SSE | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    sse = {}
    for r in rows:
        if r["protocol"] == "sse":
            sse[r["concurrency"]] = r["tok_s"]
        ratio = r["tok_s"] / sse[r["concurrency"]]
        print(f"| {r['concurrency']} | {r['protocol']} | {r['requests']} | {r['tok_s']:.1f} | {ratio:.2f}x | "
              f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} |")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
