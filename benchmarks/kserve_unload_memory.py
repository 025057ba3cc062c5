"""Memory given back by unloading a model at run time (issue 20): process RSS (and GPU memory on CUDA).

Starts ``llmcore serve --model-repository DIR`` with one model (``first``), then adds a second
model folder (``second``, the same weights unless --model says otherwise), loads it through
``POST /v2/repository/models/second/load``, runs a few requests on it, unloads it, and prints the
server's resident memory at each point: the figure that matters is how close "after unload" comes
to "before load".

Usage: .venv/bin/python benchmarks/kserve_unload_memory.py [--model M] [--device cpu|cuda]
       [--kv-cache-gib 0.5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from llmcore.bench import machine

REPO = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gpu_mib(pid: int) -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    used = [float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line) if int(p) == pid]
    return sum(used) if used else 0.0


def write_model(root: Path, name: str, args) -> None:
    (root / name / "1").mkdir(parents=True)
    cfg = {"model": args.model, "kv_cache_memory": int(args.kv_cache_gib * 2**30), "max_model_len": 512}
    if args.device:
        cfg["device"] = args.device
    (root / name / "config.yaml").write_text(yaml.safe_dump(cfg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2, help="load/unload cycles (later ones show leaks)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        write_model(root, "first", args)
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "llmcore.server", "serve", "--model-repository", str(root),
                                     "--host", "127.0.0.1", "--port", "0", "--no-access-log", "--log-level", "warning"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            url = None
            for _ in range(3000):
                m = re.search(r" at (http://\S+)", log_path.read_text(errors="replace"))
                if m:
                    url = m.group(1)
                    break
                if proc.poll() is not None:
                    raise SystemExit(log_path.read_text())
                time.sleep(0.1)
            if url is None:
                raise SystemExit("server did not start")
            client = httpx.Client(base_url=url, timeout=600)
            for _ in range(100):
                try:
                    client.get("/v2/health/ready")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            body = {"text_input": "Tell me about the sea.", "parameters": {"max_tokens": 32, "temperature": 0}}
            client.post("/v2/models/first/generate", json=body).raise_for_status()
            write_model(root, "second", args)
            rows = []

            def sample(label: str) -> None:
                time.sleep(1.0)
                rows.append((label, rss_mib(proc.pid), gpu_mib(proc.pid)))

            for i in range(1, args.rounds + 1):
                sample(f"round {i}: before load")
                client.post("/v2/repository/models/second/load").raise_for_status()
                for _ in range(4):
                    client.post("/v2/models/second/generate", json=body).raise_for_status()
                sample(f"round {i}: loaded, after 4 requests")
                client.post("/v2/repository/models/second/unload").raise_for_status()
                assert client.post("/v2/models/second/generate", json=body).status_code == 404
                sample(f"round {i}: after unload")
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"# Memory returned by unload — {machine()}; model {args.model or 'SmolLM2-135M-Instruct'}, "
          f"device {args.device or 'default'}, KV cache {args.kv_cache_gib} GiB")
    print("| point | RSS MiB | GPU MiB |")
    print("|---|---:|---:|")
    for label, rss, gpu in rows:
        print(f"| {label} | {rss:.0f} | {'-' if gpu is None else f'{gpu:.0f}'} |")
    base = rows[0][1]
    print(f"\nafter the last unload RSS is {rows[-1][1] - base:+.0f} MiB from before the first load "
          f"(the loaded model added {rows[1][1] - base:+.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
