"""llmcore on CUDA vs Hugging Face transformers ``generate``, same run, same model shapes.

Run on a machine with an NVIDIA GPU (from the repository root)::

    python benchmarks/cuda_bench.py --out /tmp/cuda_bench.json

Phases (each in its own process, so memory is clean between them):

* ``roofline``: device-to-device copy bandwidth (bytes read + written), the
  memory-bandwidth ceiling; plus cuBLAS bf16 GEMV bandwidth at the model's shapes.
* ``build``: a random Llama-1B-shaped bf16 model folder (hidden 2048, 16 layers,
  32 heads, 8 KV heads, intermediate 8192, vocab 128,256) with a generated tokenizer.
* ``hf``: transformers ``generate`` (bf16, eager attention default, greedy):
  (a) one stream; (b) the mixed workload in left-padded batches of 32.
* ``llmcore``: ``Engine(device="cuda")`` greedy: (a) one stream; (b) the mixed
  workload through continuous batching.

Workload (b): 256 requests, input and output lengths uniform in 100..1024
(``random.Random(0)``), random prompt ids, ``ignore_eos``; the figure is useful
output tokens (the requested lengths) per second of wall time.

Single-stream bandwidth counts the bytes one decode step must read: every weight
except the embedding table (one row), the LM head, and the KV cache of the
context (average over the run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = "/tmp/llmcore-bench/llama1b-bf16"


def workload(vocab: int, n: int = 256, lo: int = 100, hi: int = 1024, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        il = rng.randint(lo, hi)
        ol = rng.randint(lo, hi)
        reqs.append(([rng.randrange(3, vocab) for _ in range(il)], ol))
    return reqs


def single_prompt(vocab: int, n: int):
    rng = random.Random(1)
    return [rng.randrange(3, vocab) for _ in range(n)]


def emit(d: dict) -> None:
    print("RESULT " + json.dumps(d), flush=True)


# --------------------------------------------------------------------- phases


def phase_roofline(args) -> None:
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    nbytes = 1 << 30
    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    times = []
    for i in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e) / 1e3)
    t = statistics.median(times)
    copy_bw = 2 * nbytes / t
    del x, y
    gemv = {}
    shapes = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
              "lm_head": (128256, 2048)}
    for name, (n, k) in shapes.items():
        copies = max(1, min(16, (512 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        xv = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        for w in ws:
            F.linear(xv, w)
        reps = 20
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        for _ in range(reps):
            for w in ws:
                F.linear(xv, w)
        e.record()
        e.synchronize()
        per = s.elapsed_time(e) / 1e3 / (reps * copies)
        gemv[name] = dict(us=per * 1e6, GBps=n * k * 2 / per / 1e9)
        del ws
    emit(dict(phase="roofline", device=props.name, sms=props.multi_processor_count,
              memory_GiB=props.total_memory / 2**30, copy_GBps=copy_bw / 1e9, gemv_bf16_m1=gemv,
              torch=torch.__version__))


def phase_build(args) -> None:
    from llmcore_cuda.testing import LLAMA_1B, make_model_folder

    path = Path(args.model_dir)
    if (path / "config.json").is_file():
        emit(dict(phase="build", path=str(path), reused=True))
        return
    t0 = time.perf_counter()
    make_model_folder(path, "llama", dtype="bfloat16", init_std=0.02, **LLAMA_1B)
    emit(dict(phase="build", path=str(path), seconds=time.perf_counter() - t0))


def _weight_bytes_per_token(cfg: dict, itemsize: int = 2) -> int:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    per_layer = h * (heads * d + 2 * kvh * d) + heads * d * h + 3 * h * i + 2 * h
    return (cfg["num_hidden_layers"] * per_layer + v * h + h + h) * itemsize  # + LM head, norm, 1 embed row


def _kv_bytes_per_token(cfg: dict, itemsize: int = 2) -> int:
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * d * itemsize


def phase_hf(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    vocab = cfg["vocab_size"]
    m = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).cuda().eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    dev = "cuda"
    # (a) one stream
    p = torch.tensor([single_prompt(vocab, args.prompt_len)], device=dev)
    m.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    m.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.hf_single_tokens, do_sample=False)
    torch.cuda.synchronize()
    single = args.hf_single_tokens / (time.perf_counter() - t0)
    emit(dict(phase="hf_single", tok_s=single, new_tokens=args.hf_single_tokens, prompt_len=args.prompt_len))
    # (b) workload, left-padded batches of 32
    reqs = workload(vocab)[: args.hf_requests]
    useful = 0
    t0 = time.perf_counter()
    for b0 in range(0, len(reqs), 32):
        chunk = reqs[b0 : b0 + 32]
        width = max(len(r[0]) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (pr, _) in enumerate(chunk):
            ids[j, width - len(pr):] = torch.tensor(pr)
            mask[j, width - len(pr):] = 1
        out = m.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max(o for _, o in chunk),
                         do_sample=False)
        gen = out.shape[1] - width
        useful += sum(min(o, gen) for _, o in chunk)
        print(f"  hf batch {b0 // 32}: {gen} new tokens, {time.perf_counter() - t0:.1f} s", flush=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    emit(dict(phase="hf_workload", requests=len(reqs), useful_tokens=useful, seconds=dt, tok_s=useful / dt))


def phase_llmcore(args) -> None:
    import logging

    import torch

    from llmcore import SamplingParams
    from llmcore.engine.engine import Engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    vocab = cfg["vocab_size"]
    t0 = time.perf_counter()
    extra = {}
    if args.no_overlap:
        extra["cuda_overlap"] = False
    eng = Engine(model=args.model_dir, device="cuda", dtype="bfloat16", max_num_seqs=args.max_num_seqs,
                 max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                 enforce_eager=args.eager, extra=extra)
    start_s = time.perf_counter() - t0
    runner = eng.runner
    emit(dict(phase="llmcore_start", seconds=start_s, memory=getattr(runner, "memory_report", None),
              kv_blocks=eng.block_manager.num_blocks, graphs=sorted(getattr(runner, "graphs", {}))))

    # (a) one stream
    prompt = single_prompt(vocab, args.prompt_len)
    n = args.single_tokens

    def run(k):
        sp = SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = eng.generate([prompt], sp)
        torch.cuda.synchronize()
        assert len(out[0].outputs[0].token_ids) == k
        return time.perf_counter() - t

    run(16)
    t_first = statistics.median(run(1) for _ in range(3))
    before = dict(getattr(runner, "stats", {}))
    t_full = [run(n + 1) for _ in range(3)]
    after = dict(getattr(runner, "stats", {}))
    tf = statistics.median(t_full)
    decode_tok_s = n / (tf - t_first)
    wb = _weight_bytes_per_token(cfg)
    avg_ctx = args.prompt_len + 1 + n / 2
    kvb = _kv_bytes_per_token(cfg) * avg_ctx
    res = dict(phase="llmcore_single", decode_tok_s=decode_tok_s, e2e_tok_s=(n + 1) / tf,
               ttft_s=t_first, new_tokens=n + 1, prompt_len=args.prompt_len, weight_bytes=wb,
               kv_bytes_avg=kvb, achieved_GBps=(wb + kvb) * decode_tok_s / 1e9,
               runner_stats={k: after.get(k, 0) - before.get(k, 0) for k in after})
    graphs = getattr(runner, "graphs", {})
    if 1 in graphs:  # pure GPU time of one decode step (the graph for batch 1, last context)
        g = graphs[1].graph
        for _ in range(5):
            g.replay()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(50):
            g.replay()
        e.record()
        e.synchronize()
        res["graph_replay_ms_b1"] = s.elapsed_time(e) / 50
    emit(res)

    if args.profile:
        import cProfile
        import pstats

        sp = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        pr = cProfile.Profile()
        pr.enable()
        eng.generate([prompt], sp)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)

    # (b) workload
    reqs = workload(vocab)
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for _, o in reqs]
    before = dict(getattr(runner, "stats", {}))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = eng.generate([r[0] for r in reqs], params)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    after = dict(getattr(runner, "stats", {}))
    useful = sum(len(o.outputs[0].token_ids) for o in outs)
    assert useful == sum(o for _, o in reqs)
    st = eng.stats()
    emit(dict(phase="llmcore_workload", requests=len(reqs), useful_tokens=useful, seconds=dt,
              tok_s=useful / dt, steps=st["steps"], preemptions=st["num_preemptions"],
              kv_waste_at_peak=st["kv_waste_at_peak"],
              runner_stats={k: after.get(k, 0) - before.get(k, 0) for k in after}))

    if args.profile:  # where the host time goes (cProfile slows Python down: not for timing)
        import cProfile
        import pstats

        for name, plist, k in (("single stream", [prompt], 200),
                               ("64 requests", [r[0] for r in reqs[:64]], 200)):
            pr = cProfile.Profile()
            pr.enable()
            eng.generate(plist, SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))
            pr.disable()
            print(f"--- profile: {name}, {k} tokens each")
            pstats.Stats(pr).sort_stats("tottime").print_stats(14)


PHASES = {"roofline": phase_roofline, "build": phase_build, "hf": phase_hf, "llmcore": phase_llmcore}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=sorted(PHASES), help="run one phase in this process")
    ap.add_argument("--phases", default="roofline,build,hf,llmcore")
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--single-tokens", type=int, default=512)
    ap.add_argument("--hf-single-tokens", type=int, default=256)
    ap.add_argument("--hf-requests", type=int, default=256, help="run HF on the first N requests of (b)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2560)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.phase:
        PHASES[args.phase](args)
        return
    results = {}
    passthrough = []
    for action in ap._actions:
        if action.dest in ("help", "phase", "phases", "out"):
            continue
        val = getattr(args, action.dest)
        if isinstance(val, bool):
            if val:
                passthrough.append(action.option_strings[0])
        elif val is not None:
            passthrough += [action.option_strings[0], str(val)]
    for ph in args.phases.split(","):
        cmd = [sys.executable, "-u", __file__, "--phase", ph] + passthrough
        print(f"== phase {ph}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            if line.startswith("RESULT "):
                d = json.loads(line[7:])
                results[d["phase"]] = d
                print("  " + line.strip()[:600], flush=True)
            else:
                sys.stdout.write("  | " + line)
        if proc.wait() != 0:
            print(f"phase {ph} failed (exit {proc.returncode})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    summarize(results)


def summarize(r: dict) -> None:
    rf, hs, hw = r.get("roofline", {}), r.get("hf_single", {}), r.get("hf_workload", {})
    ls, lw = r.get("llmcore_single", {}), r.get("llmcore_workload", {})
    print("\n== summary")
    if rf:
        print(f"device: {rf['device']} ({rf['sms']} SMs, {rf['memory_GiB']:.0f} GiB); copy bandwidth "
              f"{rf['copy_GBps']:.0f} GB/s")
    if ls and rf:
        per_tok = ls["weight_bytes"] + ls["kv_bytes_avg"]
        roof = rf["copy_GBps"] * 1e9 / per_tok
        print(f"(a) single stream: llmcore {ls['decode_tok_s']:.0f} tok/s decode ({ls['e2e_tok_s']:.0f} e2e), "
              f"{ls['achieved_GBps']:.0f} GB/s = {ls['decode_tok_s'] / roof:.1%} of roofline {roof:.0f} tok/s"
              + (f"; HF {hs['tok_s']:.0f} tok/s -> {ls['decode_tok_s'] / hs['tok_s']:.1f}x" if hs else "")
              + (f"; graph replay b=1 {ls['graph_replay_ms_b1']:.3f} ms" if "graph_replay_ms_b1" in ls else ""))
    if lw:
        line = f"(b) 256 requests: llmcore {lw['tok_s']:.0f} tok/s ({lw['seconds']:.1f} s)"
        if hw:
            line += (f"; HF {hw['tok_s']:.0f} tok/s on {hw['requests']} requests ({hw['seconds']:.1f} s) -> "
                     f"{lw['tok_s'] / hw['tok_s']:.1f}x")
        print(line)


if __name__ == "__main__":
    main()
