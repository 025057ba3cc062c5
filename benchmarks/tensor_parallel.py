"""Tensor parallel on CUDA: the same random Llama served with N=1 and N=2 GPUs, same run.

Run on a machine with >= 2 NVIDIA GPUs, from the repository root (or through
``bash benchmarks/tp_gpu_run.sh bench``)::

    python benchmarks/tensor_parallel.py --out /tmp/tp_bench.json

Phases, each in its own process (clean GPU memory, a fresh process group):

* ``build``: a random bf16 model folder with Llama-3-8B shapes (hidden 4096, 32 layers,
  32 heads, 8 KV heads, intermediate 14336, vocab 128,256; ``--layers`` / ``--shape 1b``
  for smaller), weights drawn on the GPU and written as safetensors shards (to /dev/shm when
  it has room), plus a generated word-level tokenizer.
* ``run --tp N``: ``Engine(device="cuda", dtype="bfloat16", tensor_parallel_size=N)`` with
  CUDA graphs, then (a) single-stream greedy decode: one 128-token prompt, ``--new-tokens``
  generated, decode tok/s = tokens after the first / time after the first; (b) ``--concurrency``
  requests at once (default 64), 128-token prompts, ``--new-tokens`` each, ``ignore_eos``:
  output tokens / wall time (prefill included).

Prints one ``RESULT {json}`` line per phase and a table with the device names, the model
shapes, the settings, tok/s for each N and the ratio N=2 / N=1. Exit status: 0 all phases
ran, 1 a phase failed (its output is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
PROMPT_LEN = 128


def emit(d: dict) -> None:
    print("RESULT " + json.dumps(d), flush=True)


def default_dir(shape: str, layers: int | None) -> Path:
    base = Path("/dev/shm") if _free_bytes("/dev/shm") > 48 << 30 else Path("/tmp")
    return base / f"llmcore-tp-bench-{shape}-{layers or 'full'}"


def _free_bytes(path: str) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


# ----------------------------------------------------------------------------- build


def phase_build(args) -> None:
    import torch
    from safetensors.torch import save_file

    from llmcore_cuda.testing import write_wordlevel_tokenizer

    cfg = dict(SHAPES[args.shape])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    out = Path(args.model)
    marker = out / "llmcore-tp-bench.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        emit(dict(phase="build", model=str(out), cached=True, **cfg))
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    h, inter, nl = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kvh, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    d = h // heads
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, device="cuda", dtype=torch.float32, generator=gen) * std).to(torch.bfloat16).cpu()

    nbytes = 0
    shard = {"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
             "lm_head.weight": rnd(vocab, h)}
    files = 0

    def flush(tensors):
        nonlocal files, nbytes
        files += 1
        nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / f"model-{files:05d}.safetensors"), metadata={"format": "pt"})

    flush(shard)
    shard = {}
    for i in range(nl):
        p = f"model.layers.{i}."
        shard.update({
            p + "self_attn.q_proj.weight": rnd(heads * d, h), p + "self_attn.k_proj.weight": rnd(kvh * d, h),
            p + "self_attn.v_proj.weight": rnd(kvh * d, h), p + "self_attn.o_proj.weight": rnd(h, heads * d),
            p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
        if (i + 1) % 4 == 0 or i == nl - 1:
            flush(shard)
            shard = {}
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
              max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              torch_dtype="bfloat16", **cfg)
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    write_wordlevel_tokenizer(out, vocab)
    marker.write_text(json.dumps(cfg))
    emit(dict(phase="build", model=str(out), cached=False, GB=nbytes / 1e9, seconds=time.perf_counter() - t0, **cfg))


# ------------------------------------------------------------------------------- run


def phase_run(args) -> None:
    import torch

    from llmcore import Engine, SamplingParams

    model = Path(args.model)
    cfg = json.loads((model / "config.json").read_text())
    vocab = cfg["vocab_size"]
    rng = random.Random(0)
    t0 = time.perf_counter()
    eng = Engine(model=str(model), device="cuda", dtype="bfloat16", tensor_parallel_size=args.tp,
                 max_num_seqs=args.concurrency, max_model_len=args.max_model_len, progress=False)
    start_s = time.perf_counter() - t0
    try:
        sp = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        warm = [rng.randrange(3, vocab) for _ in range(PROMPT_LEN)]
        eng.generate([warm], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        # (a) single stream: time from the first streamed token to the last
        prompt = [rng.randrange(3, vocab) for _ in range(PROMPT_LEN)]
        stamps = []
        t_req = time.perf_counter()
        for delta in eng.stream(prompt, sp):
            stamps.extend([time.perf_counter()] * len(delta.token_ids))
        ttft = stamps[0] - t_req
        single = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        # (b) concurrent requests, all queued at once
        reqs = [[rng.randrange(3, vocab) for _ in range(PROMPT_LEN)] for _ in range(args.concurrency)]
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        outs = eng.generate(reqs, sp)
        wall = time.perf_counter() - t1
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        stats = dict(getattr(eng.runner, "stats", {}))
        kv_blocks = eng.block_manager.num_blocks
    finally:
        eng.shutdown()
    emit(dict(phase="run", tp=args.tp, start_s=start_s, single_tok_s=single, ttft_ms=ttft * 1e3,
              concurrent=args.concurrency, concurrent_tok_s=toks / wall, concurrent_wall_s=wall,
              new_tokens=args.new_tokens, runner_stats=stats, kv_blocks=kv_blocks))


# ------------------------------------------------------------------------------ main


def _phase(argv: list[str], timeout: float) -> tuple[dict | None, str]:
    cmd = [sys.executable, __file__, *argv]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
        ok = p.returncode == 0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        out += f"\n(timed out after {timeout:.0f} s)"
        ok = False
    result = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    print(f"  ... {time.perf_counter() - t0:.1f} s", flush=True)
    if not ok or result is None:
        print(out[-6000:], flush=True)
        return None, out
    return result, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["all", "build", "run"], default="all")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (faster)")
    ap.add_argument("--model", default=None, help="model folder (default: /dev/shm or /tmp)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--tp-sizes", default="1,2", help="sizes compared in --phase all")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--phase-timeout", type=float, default=240)
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    args = ap.parse_args()
    args.model = args.model or str(default_dir(args.shape, args.layers))
    if args.phase == "build":
        phase_build(args)
        return 0
    if args.phase == "run":
        phase_run(args)
        return 0

    import torch

    n_gpu = torch.cuda.device_count()
    devices = [torch.cuda.get_device_name(i) for i in range(n_gpu)]
    sizes = [int(x) for x in args.tp_sizes.split(",")]
    print(f"devices: {n_gpu} x {', '.join(sorted(set(devices)))}; torch {torch.__version__}", flush=True)
    if max(sizes) > n_gpu:
        print(f"error: --tp-sizes {args.tp_sizes} needs {max(sizes)} GPUs, {n_gpu} here", file=sys.stderr)
        return 1
    common = ["--shape", args.shape, "--model", args.model] + (["--layers", str(args.layers)] if args.layers else [])
    build, _ = _phase(["--phase", "build", *common], args.phase_timeout)
    if build is None:
        return 1
    runs = {}
    status = 0
    for n in sizes:
        res, _ = _phase(["--phase", "run", "--tp", str(n), "--new-tokens", str(args.new_tokens), "--concurrency",
                         str(args.concurrency), "--max-model-len", str(args.max_model_len), *common],
                        args.phase_timeout)
        if res is None:
            status = 1
            continue
        runs[n] = res
    shape = {k: build[k] for k in SHAPES[args.shape] if k in build}
    report = dict(devices=devices, torch=torch.__version__, model=shape, dtype="bfloat16",
                  prompt_len=PROMPT_LEN, new_tokens=args.new_tokens, concurrency=args.concurrency,
                  cuda_graphs=True, runs={str(k): v for k, v in runs.items()})
    print()
    print(f"devices   {n_gpu} x {', '.join(sorted(set(devices)))} (torch {torch.__version__})")
    print("model     random Llama, " + ", ".join(f"{k}={v}" for k, v in shape.items()) + ", bf16")
    print(f"settings  CUDA graphs on, greedy, ignore_eos, prompt {PROMPT_LEN} tokens, {args.new_tokens} new "
          f"tokens; concurrent: {args.concurrency} requests at once; NVLink multicast off")
    rows = [("TP", "start s", "single-stream tok/s", "TTFT ms", f"{args.concurrency}-concurrent tok/s")]
    for n, r in sorted(runs.items()):
        rows.append((str(n), f"{r['start_s']:.1f}", f"{r['single_tok_s']:.1f}", f"{r['ttft_ms']:.1f}",
                     f"{r['concurrent_tok_s']:.1f}"))
    base = runs.get(1)
    for n, r in sorted(runs.items()):
        if base and n != 1:
            rows.append((f"{n} / 1", "", f"{r['single_tok_s'] / base['single_tok_s']:.2f}x", "",
                         f"{r['concurrent_tok_s'] / base['concurrent_tok_s']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
