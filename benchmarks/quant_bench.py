"""Quantization on the CPU: quality, memory and speed of each method vs unquantized bf16 (same run).

Each method runs in its own process (so peak RSS is its own), on the embedded
SmolLM2-135M-Instruct through ``Engine()``:

* weight bytes (every weight tensor, each storage once) and the bytes one decode
  step streams (all of them but the input-embedding table, unless the output
  projection reads it);
* peak RSS of the process (loading included) and RSS after loading;
* with ``--load-memory``: only the load, each method in a fresh process — RSS
  when the runner starts loading (torch, the tokenizer and the plugins are in),
  peak RSS when the runner's load returns and when ``Engine()`` returns (the
  CPU plugin's set-up and the KV cache included), and the anonymous /
  file-backed split at the peak (the safetensors file is memory-mapped, so
  pages read from it count as RSS too);
* perplexity on tests/data/perplexity.txt (prose written for the project);
* single-stream decode tok/s (one ~40-token chat prompt, 128 new tokens, greedy,
  EOS ignored; timed from the first token to the last) and the memory bandwidth
  that implies; batch tok/s (``--batch`` prompts submitted at once, wall time).

With ``--llama-cpp-python PY`` (a Python with llama-cpp-python installed) the
same prompt runs through llama.cpp on the same GGUF (Q4_1), same threads, as the
peer baseline. Speeds are the median of ``--repeats``; the machine's load
average is printed next to them (figures taken under load are not comparable).

    .venv/bin/python benchmarks/quant_bench.py --threads 2 [--llama-cpp-python /path/bin/python]
    .venv/bin/python benchmarks/quant_bench.py --load-memory --methods none,eetq,int4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "tests" / "data" / "calibration.txt"
METHODS = ("none", "eetq", "int4", "awq", "bnb-int8", "bnb-nf4")


def load_avg() -> float:
    return os.getloadavg()[0]


def rss_now() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (peak RSS), ``RssAnon`` and ``RssFile`` of this process, in bytes."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def decode_bytes(model) -> int:
    """Bytes a decode step reads: every weight except an input-embedding table nothing else reads."""
    from llmcore.quantization.handler import weight_bytes

    total = weight_bytes(model)
    emb = model.model.embed_tokens
    if getattr(model, "lm_head", None) is None and model.logits_proj is None:
        return total  # the output projection is the embedding table itself
    shared = weight_bytes(emb) if emb.weight.data_ptr() in {
        t.data_ptr() for t in (model.logits_proj or model.lm_head).buffers()} else 0
    return total - weight_bytes(emb) + shared


def awq_checkpoint(cache: Path) -> Path:
    from llmcore.quantization.awq_calibrate import quantize_awq

    key = hashlib.sha256(CALIBRATION.read_bytes()).hexdigest()[:12]
    out = cache / f"smollm2-awq-{key}"
    if not (out / "llmcore-quantize.json").is_file():
        print(f"making the AWQ checkpoint (scale search on {CALIBRATION.name}) in {out} ...", file=sys.stderr)
        quantize_awq(None, CALIBRATION, out)
    return out


def time_single(engine, prompt: str, new_tokens: int) -> tuple[float, float]:
    """(decode tok/s from first to last token, end-to-end tok/s) for one request."""
    from llmcore import SamplingParams

    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return (new_tokens - 1) / (end - first), new_tokens / (end - t0)


def time_batch(engine, prompts: list[str], new_tokens: int) -> float:
    from llmcore import SamplingParams

    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def worker(args) -> dict:
    import resource

    import torch

    from llmcore import Engine, SamplingParams
    from llmcore.bench import make_prompts
    from llmcore.quantization.handler import weight_bytes
    from llmcore.quantization.quality import perplexity

    # "eetq/torch": the method on the CPU's torch decode path instead of the native step
    name = args.worker
    method, _, path = name.partition("/")
    model = str(awq_checkpoint(Path(args.cache))) if method == "awq" else args.model
    t0 = time.perf_counter()
    engine = Engine(model=model, device="cpu", dtype="bfloat16", quantization=None if method == "none" else method,
                    max_num_seqs=max(args.batch, 1), num_threads=args.threads, progress=False,
                    kv_cache_memory=256 << 20, native_decode=path != "torch")
    load_s = time.perf_counter() - t0
    rss_loaded = rss_now()
    m = engine.runner.model
    row = {"method": name, "decode_step": type(engine.runner.decode_graph).__name__, "load_s": load_s, "weight_bytes": weight_bytes(m), "decode_bytes": decode_bytes(m),
           "rss_loaded": rss_loaded, "threads": torch.get_num_threads(), "load_avg_start": load_avg()}
    prompts = make_prompts(engine.tokenizer, max(args.batch, 1))
    row["prompt_tokens"] = len(engine.tokenizer.encode(prompts[0]))
    engine.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0))  # warm-up
    singles = [time_single(engine, prompts[0], args.new_tokens) for _ in range(args.repeats)]
    row["decode_tok_s"] = statistics.median(s[0] for s in singles)
    row["e2e_tok_s"] = statistics.median(s[1] for s in singles)
    row["batch_tok_s"] = statistics.median(time_batch(engine, prompts[: args.batch], args.new_tokens)
                                           for _ in range(args.repeats))
    row["ppl"] = None if args.skip_ppl else perplexity(engine)
    row["text"] = engine.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0))[0] \
        .outputs[0].text
    row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["load_avg_end"] = load_avg()
    return row


def load_memory_worker(args) -> dict:
    """Peak RSS of loading alone: ``Engine()`` in this (fresh) process, nothing run afterwards.

    ``VmHWM`` is the kernel's high-water mark of RSS, so reading it when the runner's load
    returns gives the load's peak exactly; a thread sampling ``/proc/self/status`` every 2 ms
    tells how much of the peak was anonymous memory (tensors) and how much file pages (the
    memory-mapped checkpoint), which the kernel does not record.
    """
    import threading

    import torch

    from llmcore import Engine
    from llmcore.models.loader import resolve_model
    from llmcore.runtime import runner as runner_mod

    method = args.worker
    model = str(awq_checkpoint(Path(args.cache))) if method == "awq" else str(args.model or resolve_model(None))
    before = proc_status()
    at_peak = {"VmRSS": 0}  # the sample with the highest RSS
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = proc_status()
            if s["VmRSS"] > at_peak["VmRSS"]:
                at_peak.update(s)
            time.sleep(0.002)

    marks: dict[str, int] = {}
    original = runner_mod.TorchModelRunner._load

    def timed_load(self, *a, **kw):
        marks["rss_load_start"] = proc_status()["VmRSS"]  # the tokenizer and the plugins are in by now
        out = original(self, *a, **kw)
        marks["runner_load_hwm"] = proc_status()["VmHWM"]
        return out

    runner_mod.TorchModelRunner._load = timed_load
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    engine = Engine(model=model, device="cpu", dtype="bfloat16", quantization=None if method == "none" else method,
                    num_threads=args.threads, progress=False, kv_cache_memory=16 << 20)
    load_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    after = proc_status()
    from llmcore.quantization.handler import weight_bytes

    return {"method": method, "load_s": load_s, "threads": torch.get_num_threads(),
            "rss_before": before["VmRSS"], "rss_load_start": marks.get("rss_load_start", 0),
            "runner_load_hwm": marks.get("runner_load_hwm", 0),
            "engine_hwm": after["VmHWM"], "rss_after": after["VmRSS"],
            "sampled_peak_anon": at_peak.get("RssAnon", 0), "sampled_peak_file": at_peak.get("RssFile", 0),
            "weight_bytes": weight_bytes(engine.runner.model), "load_avg": load_avg()}


def report_load_memory(rows: list[dict]) -> None:
    from llmcore.bench import machine

    import torch

    print(f"\nmachine:  {machine()}; torch {torch.__version__}, {rows[0]['threads']} threads; load average "
          f"{min(r['load_avg'] for r in rows):.1f}-{max(r['load_avg'] for r in rows):.1f}")
    print("each method in a fresh process; Engine(quantization=..., dtype='bfloat16', device='cpu', "
          "kv_cache_memory=16 MB); MB = 10^6 bytes\n")
    print("| method | weights MB | RSS when the runner starts loading MB | peak RSS, runner load MB | "
          "load added MB | peak RSS, Engine() MB | at the peak: anon / file MB | RSS after MB | Engine() s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "bf16 (none)" if r["method"] == "none" else r["method"]
        print(f"| {name} | {r['weight_bytes'] / 1e6:.0f} | {r['rss_load_start'] / 1e6:.0f} | "
              f"{r['runner_load_hwm'] / 1e6:.0f} | {(r['runner_load_hwm'] - r['rss_load_start']) / 1e6:.0f} | "
              f"{r['engine_hwm'] / 1e6:.0f} | "
              f"{r['sampled_peak_anon'] / 1e6:.0f} / {r['sampled_peak_file'] / 1e6:.0f} | "
              f"{r['rss_after'] / 1e6:.0f} | {r['load_s']:.1f} |")


LLAMA_CPP = r"""
import json, statistics, sys, time
from llama_cpp import Llama
gguf, prompt, n_new, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
eos = llm.token_eos()
def once():
    t0 = time.perf_counter(); times = []
    for _ in llm.create_completion(prompt, max_tokens=n_new, temperature=0.0, top_k=1, stream=True,
                                   logit_bias={eos: -1e9}):
        times.append(time.perf_counter())
    n = len(times)
    return (n - 1) / (times[-1] - times[0]), n / (times[-1] - t0), n
once()
runs = [once() for _ in range(repeats)]
print(json.dumps({"decode_tok_s": statistics.median(r[0] for r in runs),
                  "e2e_tok_s": statistics.median(r[1] for r in runs), "tokens": runs[0][2]}))
"""


def llama_cpp(args) -> dict | None:
    from llmcore.bench import make_prompts
    from llmcore.models.loader import default_model_path, resolve_model
    from llmcore.models.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model(None), [])
    prompt = make_prompts(tok, 1)[0]
    gguf = default_model_path()
    proc = subprocess.run([args.llama_cpp_python, "-c", LLAMA_CPP, str(gguf), prompt, str(args.new_tokens),
                           str(args.threads or os.cpu_count()), str(args.repeats)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"llama.cpp run failed: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["weight_bytes"] = gguf.stat().st_size
    return row


def report(rows: list[dict], lcpp: dict | None, args) -> None:
    from llmcore.bench import machine

    import torch

    base = next((r for r in rows if r["method"] == "none"), None)
    print(f"\nmachine:  {machine()}; load average {min(r['load_avg_start'] for r in rows):.1f}"
          f"-{max(r['load_avg_end'] for r in rows):.1f} during the runs")
    print(f"model:    SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, dequantized), bfloat16 activations, "
          f"device cpu, {rows[0]['threads']} threads, torch {torch.__version__}")
    print(f"settings: greedy, {args.new_tokens} new tokens, ~{rows[0]['prompt_tokens']}-token chat prompt, "
          f"batch {args.batch}, median of {args.repeats}; perplexity on tests/data/perplexity.txt\n")
    print("| method | weights MB | read/token MB | peak RSS MB | perplexity | 1 stream tok/s | GB/s | "
          "vs bf16 | vs llama.cpp | batch %d tok/s | vs bf16 |" % args.batch)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ppl = "-" if r["ppl"] is None else (f"{r['ppl']:.2f}" + (
            f" ({100 * (r['ppl'] / base['ppl'] - 1):+.1f}%)" if base and base["ppl"] and r is not base else ""))
        gbs = r["decode_bytes"] * r["decode_tok_s"] / 1e9
        vs = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        vl = f"{r['decode_tok_s'] / lcpp['decode_tok_s']:.2f}x" if lcpp else "-"
        vb = f"{r['batch_tok_s'] / base['batch_tok_s']:.2f}x" if base else "-"
        name = "bf16 (none)" if r["method"] == "none" else r["method"]
        print(f"| {name} | {r['weight_bytes'] / 1e6:.0f} | {r['decode_bytes'] / 1e6:.0f} | {r['peak_rss'] / 1e6:.0f} | "
              f"{ppl} | {r['decode_tok_s']:.1f} | {gbs:.1f} | {vs} | {vl} | {r['batch_tok_s']:.1f} | {vb} |")
    if lcpp:
        print(f"| llama.cpp Q4_1 (llama-cpp-python) | {lcpp['weight_bytes'] / 1e6:.0f} (file) | - | - | - | "
              f"{lcpp['decode_tok_s']:.1f} | - | - | 1.00x | - | - |")
    print()
    for r in rows:
        print(f"{r['method']}: load {r['load_s']:.1f} s, RSS after load {r['rss_loaded'] / 1e6:.0f} MB, "
              f"end-to-end single stream {r['e2e_tok_s']:.1f} tok/s, 'The capital of France is' -> {r['text']!r}")


def gpu_kernels() -> None:
    """Triton int4/int8 kernels vs cuBLAS bf16 on decode and batch shapes (CUDA events, median of 50)."""
    import torch
    import torch.nn.functional as F

    from llmcore.quantization.awq_format import pack_awq, pick_group_size, quantize_groups_minmax
    from llmcore.quantization.int8 import quantize_int8
    from llmcore.quantization.triton.int4_mm import int4_mm
    from llmcore.quantization.triton.int8_mm import int8_weight_only_mm

    def median_ms(fn, n=50):
        fn()
        times = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape (N x K) | M | bf16 cuBLAS us | int8 Triton us | int4 Triton us (g128; g64 at K=576) | int8 GB/s | int4 GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    shapes = [("SmolLM2 gate_up", 3072, 576), ("SmolLM2 lm_head", 49152, 576), ("1B qkv", 3072, 2048),
              ("1B gate_up", 16384, 2048), ("1B down", 2048, 8192)]
    for name, n, k in shapes:
        w = torch.randn(n, k, device="cuda") * 0.02
        wb = w.bfloat16()
        q8, s8 = quantize_int8(w)
        s8 = s8.bfloat16()
        g = pick_group_size(k, 128)
        q4, sc, mn = quantize_groups_minmax(w, g, torch.bfloat16)
        qw, sc, mn = pack_awq(q4.t()), sc.t().contiguous().bfloat16(), mn.t().contiguous().bfloat16()
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf = median_ms(lambda: F.linear(x, wb)) * 1e3
            t_8 = median_ms(lambda: int8_weight_only_mm(x, q8, s8)) * 1e3
            t_4 = median_ms(lambda: int4_mm(x, qw, sc, mn, g)) * 1e3
            print(f"| {name} {n}x{k} | {m} | {t_bf:.1f} | {t_8:.1f} | {t_4:.1f} | "
                  f"{n * k / t_8 / 1e3:.0f} | {n * k / 2 / t_4 / 1e3:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)}; append /torch for the CPU's torch "
                        "decode path instead of the native step (e.g. eetq/torch)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--llama-cpp-python", default=None, metavar="PY",
                   help="a Python interpreter with llama-cpp-python installed: measure llama.cpp too")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "llmcore" / "quant_bench"),
                   help="where the AWQ checkpoint made for the run is kept")
    p.add_argument("--json", action="store_true")
    p.add_argument("--gpu-kernels", action="store_true", help="time the Triton kernels on CUDA and exit")
    p.add_argument("--load-memory", action="store_true",
                   help="measure only the peak RSS of loading each method (a fresh process each), and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gpu_kernels:
        gpu_kernels()
        return 0
    if args.worker:
        print("RESULT " + json.dumps(load_memory_worker(args) if args.load_memory else worker(args)))
        return 0
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, "--new-tokens", str(args.new_tokens), "--batch",
               str(args.batch), "--repeats", str(args.repeats), "--cache", args.cache]
        for flag, value in (("--threads", args.threads), ("--model", args.model)):
            if value:
                cmd += [flag, str(value)]
        if args.skip_ppl:
            cmd.append("--skip-ppl")
        if args.load_memory:
            cmd.append("--load-memory")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{method}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1][7:]))
        if args.load_memory:
            print(f"{method}: done (peak RSS {rows[-1]['runner_load_hwm'] / 1e6:.0f} MB)", file=sys.stderr)
            continue
        print(f"{method}: done ({rows[-1]['decode_tok_s']:.1f} tok/s single stream)", file=sys.stderr)
    if not rows:
        return 1
    if args.load_memory:
        report_load_memory(rows)
        if args.json:
            print(json.dumps({"rows": rows}))
        return 0
    lcpp = llama_cpp(args) if args.llama_cpp_python else None
    report(rows, lcpp, args)
    if args.json:
        print(json.dumps({"rows": rows, "llama_cpp": lcpp}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
