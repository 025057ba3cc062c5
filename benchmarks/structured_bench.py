"""Structured-output overhead: 64 concurrent JSON-schema requests against 64 unconstrained, same run.

Both phases use the same prompts, greedy decoding, and the same number of tokens per request:
the schema is an array of exactly ``--items`` small integers, so a constrained reply has a fixed
shape; the unconstrained phase generates exactly as many tokens (``ignore_eos``). The grammars
are compiled before timing (compiling is once per schema, reported apart). Prints, per phase:
requests, tokens, wall time, tokens/s, time per engine step, and for the constrained phase the
time spent filling and applying masks (``apply``) and advancing matchers (``accept``), then the
per-token overhead against the unconstrained phase.

    python benchmarks/structured_bench.py                       # embedded SmolLM2 on the CPU
    python benchmarks/structured_bench.py --device cuda --dtype bfloat16 --requests 64
    python benchmarks/structured_bench.py --requests 4 --items 4   # a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from llmcore import Engine, SamplingParams


def schema(items: int) -> dict:
    return {"type": "array", "items": {"type": "integer", "minimum": 10, "maximum": 99},
            "minItems": items, "maxItems": items}


def timed(states, name: str, acc: dict[str, float]):
    fn = getattr(states, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[name] += time.perf_counter() - t0

    setattr(states, name, wrapper)


def run_phase(engine: Engine, prompts: list[str], params: list[SamplingParams]) -> dict:
    steps0 = engine.stats()["steps"]
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = engine.stats()["steps"] - steps0
    return {"outs": outs, "wall": wall, "tokens": tokens, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=64, help="concurrent requests per phase (default 64)")
    ap.add_argument("--items", type=int, default=24, help="integers in each reply's array (default 24)")
    args = ap.parse_args()

    # no prefix caching: the second phase would skip the prefill the first one paid for
    engine = Engine(model=args.model, device=args.device, dtype=args.dtype, progress=False,
                    max_num_seqs=max(args.requests, 1), enable_prefix_caching=False)
    sch = schema(args.items)
    prompts = [engine.apply_chat_template([{"role": "user", "content": f"List {args.items} two-digit numbers, "
                                                                       f"seed {i}, as a JSON array."}])
               for i in range(args.requests)]
    constrained = SamplingParams(max_tokens=8 * args.items + 16, temperature=0, structured_output={"json": sch})
    t0 = time.perf_counter()
    engine.structured.compile(constrained.structured_output)
    compile_s = time.perf_counter() - t0
    warm = run_phase(engine, prompts[:2], [constrained] * 2)  # warm-up: first masks, kernels
    run_phase(engine, prompts[:2], [SamplingParams(max_tokens=8, temperature=0)] * 2)
    acc = {"apply": 0.0, "accept": 0.0}
    timed(engine.structured.states, "apply", acc)
    timed(engine.structured.states, "accept", acc)

    c = run_phase(engine, prompts, [constrained] * len(prompts))
    applied, accepted = acc["apply"], acc["accept"]
    per_req = [len(o.outputs[0].token_ids) for o in c["outs"]]
    valid = sum(isinstance(json.loads(o.outputs[0].text), list) for o in c["outs"] if o.outputs[0].finish_reason == "stop")
    plain = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in per_req]
    p = run_phase(engine, prompts, plain)

    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {dev}; device {engine.probe.name}, dtype {engine.dtype}, model {engine.model_path.name}; "
          f"{args.requests} concurrent requests, arrays of {args.items} integers, greedy")
    print(f"first schema compile {compile_s * 1e3:.1f} ms (once; includes the tokenizer tables); warm-up {warm['wall']:.2f} s; "
          f"{valid}/{len(c['outs'])} constrained replies parse as JSON")
    print(f"{'phase':<14} {'tokens':>7} {'steps':>6} {'wall s':>8} {'tok/s':>8} {'ms/step':>8} "
          f"{'mask ms/step':>12} {'accept ms/step':>14}")
    for name, r, mask, acc_s in (("unconstrained", p, None, None), ("json schema", c, applied, accepted)):
        steps = max(r["steps"], 1)
        print(f"{name:<14} {r['tokens']:>7} {r['steps']:>6} {r['wall']:>8.2f} {r['tokens'] / r['wall']:>8.1f} "
              f"{r['wall'] / steps * 1e3:>8.2f} "
              + (f"{mask / steps * 1e3:>12.3f} {acc_s / steps * 1e3:>14.3f}" if mask is not None else f"{'-':>12} {'-':>14}"))
    over = (c["wall"] / c["tokens"]) / (p["wall"] / p["tokens"]) - 1
    print(f"per-token overhead of the JSON schema: {over * 100:+.1f}% "
          f"({(c['wall'] / c['tokens'] - p['wall'] / p['tokens']) * 1e6:+.1f} us/token)")


if __name__ == "__main__":
    main()
