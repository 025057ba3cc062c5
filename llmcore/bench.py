"""``llmcore bench``: llmcore vs Hugging Face transformers ``generate``, same process, same weights.

Two workloads on chat-templated prompts of about 40 tokens, greedy, a fixed
number of new tokens (EOS ignored so every run does the same work):

* single stream: one request, ``--new-tokens`` tokens;
* batch: ``--batch`` requests submitted at once (llmcore: continuous batching;
  transformers: one left-padded batch).

Prints a table with the machine, the model, the settings, tok/s (median of
``--repeats``) and the ratio to transformers measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcore.engine.engine import Engine
from llmcore.sampling_params import SamplingParams

TOPICS = [
    "the water cycle", "how vaccines work", "the history of Rome", "black holes", "photosynthesis",
    "the French revolution", "machine learning", "plate tectonics", "the printing press", "jazz music",
    "coral reefs", "the stock market", "volcanoes", "the human heart", "renewable energy", "chess openings",
]


def make_prompts(tokenizer, n: int) -> list[str]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        msg = f"Please write a detailed, friendly explanation of {topic} for a curious student, number {i}."
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": msg}]))
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def bench_llmcore(engine, prompts, new_tokens, repeats):
    p = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = engine.generate(prompts, p)
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    return statistics.median(rates)


def bench_hf(model, tok, prompts, new_tokens, repeats):
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**tok(prompts[:1], return_tensors="pt", add_special_tokens=False),
                       max_new_tokens=4, do_sample=False)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            dt = time.perf_counter() - t0
            rates.append((out.shape[1] - enc.input_ids.shape[1]) * len(prompts) / dt)
    return statistics.median(rates)


def run(args: argparse.Namespace) -> int:
    if args.compile_decode:
        raise SystemExit("llmcore bench: --compile-decode was removed with the CPU's Inductor-compiled decode "
                         "step (the native step, measured by default, is faster); compare with --torch-decode")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(model=args.model, device=args.device, dtype=args.dtype, progress=False,
                    max_num_seqs=max(args.batch, 1), num_threads=args.threads)
    folder = engine.model_path
    prompts = make_prompts(engine.tokenizer, max(args.batch, 1))
    n_prompt = len(engine.tokenizer.encode(prompts[0]))
    dtype = getattr(torch, engine.dtype)
    hf = None
    if not args.skip_hf:
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        hf_tok = AutoTokenizer.from_pretrained(str(folder))
    # further engines on the same weights, each measured on the same prompts in this process
    variants = [("llmcore", engine)]
    if args.torch_decode:
        variants.append(("llmcore torch decode", Engine(
            model=args.model, device=args.device, dtype=args.dtype, progress=False,
            max_num_seqs=max(args.batch, 1), num_threads=args.threads, native_decode=False)))
    rows = []
    work = [("single stream", prompts[:1]), (f"{args.batch} concurrent", prompts[: args.batch])]
    for name, ps in tqdm(work, desc="Benchmarks", unit="workload"):
        rates = [bench_llmcore(e, ps, args.new_tokens, args.repeats) for _, e in variants]
        ref = bench_hf(hf, hf_tok, ps, args.new_tokens, args.repeats) if hf is not None else None
        rows.append((name, rates, ref))
    decode = type(engine.runner.decode_graph).__name__ if getattr(engine, "runner", None) is not None else "-"
    print(f"\nmachine:  {machine()}")
    print(f"model:    {folder.name} ({engine.model_config.num_params() / 1e6:.0f}M params), {engine.dtype}, "
          f"device {engine.probe.name}")
    print(f"settings: greedy, {args.new_tokens} new tokens, ~{n_prompt}-token chat prompts, "
          f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"llmcore decode step: {decode}\n")
    head = "| workload |" + "".join(f" {n} tok/s | ratio to HF |" for n, _ in variants)
    print(head + " HF transformers tok/s |")
    print("|---" + "|---:" * (head.count("|") - 1) + "|")

    def cell(v, ref):
        return f" {v:.1f} | {v / ref:.2f}x |" if ref else f" {v:.1f} | - |"

    for name, rates, ref in rows:
        print(f"| {name} |" + "".join(cell(v, ref) for v in rates) + (f" {ref:.1f} |" if ref else " - |"))
    if args.json:
        print(json.dumps([{"workload": n, **{v: r for (v, _), r in zip(variants, rates)}, "hf": ref}
                          for n, rates, ref in rows]))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="throughput vs Hugging Face transformers generate, same run",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  llmcore bench                                   # embedded SmolLM2, best device\n"
               "  llmcore bench --device cpu --batch 16 --new-tokens 64 --repeats 1\n"
               "  llmcore bench --model ./Qwen2.5-0.5B-Instruct --skip-hf --json\n",
    )
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="default: the device's (bfloat16 on AVX512-BF16 CPUs)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-hf", action="store_true", help="measure llmcore only")
    p.add_argument("--compile-decode", action="store_true", help=argparse.SUPPRESS)  # removed: run() says so
    p.add_argument("--torch-decode", action="store_true",
                   help="also measure an engine without the CPU's native decode step (--no-native-decode)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
