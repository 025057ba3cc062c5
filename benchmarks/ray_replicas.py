"""Ray Serve replicas benchmark: generated tokens/s of 1 replica vs 2 replicas (``llmcore serve --ray``).

For each replica count (default 1, then 2) it starts ``llmcore serve --ray --replicas N`` on a
fresh local Ray instance, every replica on the CPU with ``--ray-num-cpus-per-replica 1`` and
``--threads 1`` (one torch thread each), warms every replica up, then keeps --concurrency
streaming chat requests in flight until --requests have completed and reports tokens/s,
requests/s, time to first token, inter-token latency and end-to-end latency (the same client
as benchmarks/serve_bench.py: httpx on asyncio in this process). The last line is the ratio of
the 2-replica to the 1-replica throughput.

Every request asks for --max-tokens tokens with ignore_eos, so all runs generate the same amount.
The client, Ray Serve's HTTP proxy and the replicas share the machine: on a 2-core CPU, two
1-thread replicas compete with the proxy and the client for the cores, so expect less than 2x.

Usage: .venv/bin/python benchmarks/ray_replicas.py [--replicas 1 2] [--concurrency 8] [--requests 32]
       [--max-tokens 64] [--model M] [--threads 1] [--max-num-seqs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import machine, one_request, run_level  # noqa: E402  (the same client and statistics)

MODEL_NAME = "bench"


def start(args, replicas: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "llmcore.server", "serve", "--ray", "--replicas", str(replicas),
           "--ray-num-cpus-per-replica", str(args.cpus_per_replica), "--threads", str(args.threads),
           "--device", args.device, "--port", "0", "--log-level", "warning", "--max-queue", "1024",
           "--served-model-name", MODEL_NAME]
    if args.model:
        cmd += ["--model", args.model]
    for opt in ("dtype", "max_num_seqs"):
        v = getattr(args, opt)
        if v is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = re.search(r"llmcore serve: .* on Ray Serve .* at (http://\S+)", text)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"llmcore serve --ray exited with {proc.returncode}:\n{text[-5000:]}")
        time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"llmcore serve --ray did not start in 600 s; log: {log_path}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # stops Serve and the local Ray instance
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def warm_up(url: str, replicas: int) -> set[str]:
    """Send small requests until every replica answered one (Ray Serve picks the replica)."""
    seen: set[str] = set()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for _ in range(20):
            await asyncio.gather(*(one_request(client, MODEL_NAME, 10_000 + i, 4) for i in range(2 * replicas)))
            for _ in range(4 * replicas):
                r = await client.get("/health")
                seen.add(r.headers.get("x-llmcore-replica", "?"))
            if len(seen) >= replicas:
                break
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts to compare")
    ap.add_argument("--concurrency", type=int, default=8, help="streaming requests in flight (default 8)")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default 4 x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica (default 1)")
    ap.add_argument("--cpus-per-replica", type=float, default=1, help="--ray-num-cpus-per-replica (default 1)")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    args = ap.parse_args()
    total = args.requests or 4 * args.concurrency

    load_start = os.getloadavg()
    rows = []
    info = {}
    for n in args.replicas:
        log_path = Path(tempfile.mkdtemp(prefix="ray-replicas-")) / "server.log"
        t0 = time.monotonic()
        proc, url = start(args, n, log_path)
        ready = time.monotonic() - t0
        try:
            seen = asyncio.run(warm_up(url, n))
            info = httpx.get(url + "/health", timeout=30).json()["models"][MODEL_NAME]
            row = asyncio.run(run_level(url, {}, MODEL_NAME, args.concurrency, total, args.max_tokens))
        finally:
            stop(proc)
        row.update(replicas=n, ready_s=ready, answered=len(seen))
        rows.append(row)
        print(f"  {n} replica(s): {row['tok_s']:.1f} tok/s (ready in {ready:.0f} s, {len(seen)} answered)",
              file=sys.stderr, flush=True)

    import ray
    import torch

    print(f"\nMachine: {machine()}; torch {torch.__version__}, ray {ray.__version__}; load average at start "
          f"{', '.join(f'{x:.2f}' for x in load_start)}, at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"Model: {args.model or 'embedded SmolLM2-135M-Instruct'} on {info.get('device', args.device)} "
          f"(max_model_len {info.get('max_model_len')}); per replica: {args.cpus_per_replica:g} Ray CPU, "
          f"{args.threads} torch thread(s), max_num_seqs={args.max_num_seqs or 64}, dtype={args.dtype or 'auto'}")
    print(f"Workload: {total} streaming chat completions, {args.concurrency} in flight, {args.max_tokens} tokens "
          "each (ignore_eos, greedy), ~30-token prompts; client httpx/asyncio on the same machine, through "
          "Ray Serve's HTTP proxy\n")
    print("| replicas | replicas answered | requests | tokens/s | requests/s | TTFT p50 (ms) | ITL p50 (ms) "
          "| ITL p99 (ms) | e2e p50 (s) | startup (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['replicas']} | {r['answered']} | {r['requests']} | {r['tok_s']:.1f} | {r['req_s']:.2f} | "
              f"{r['ttft_p50'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} | {r['itl_p99'] * 1e3:.1f} | "
              f"{r['e2e_p50']:.2f} | {r['ready_s']:.0f} |")
    by_n = {r["replicas"]: r for r in rows}
    if 1 in by_n and 2 in by_n:
        print(f"\n2 replicas vs 1: {by_n[2]['tok_s'] / by_n[1]['tok_s']:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
