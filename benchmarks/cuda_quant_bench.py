"""Single-stream decode on CUDA: bf16 vs the quantized methods, same process, same model shapes.

Run on a machine with an NVIDIA GPU (from the repository root)::

    PYTHONPATH=$PWD:$PWD/plugins/cpu:$PWD/plugins/cuda:$PWD/plugins/neuron:$PWD/plugins/rbln \
        python3 benchmarks/cuda_quant_bench.py --shape smollm2 --methods none,eetq,int4

The model is random (no downloads: the GPU image has no model files) with the shapes of
SmolLM2-135M-Instruct (``llmcore.testing.configs.SMOLLM2_135M``: hidden 576, 30 layers, tied
49,152-token vocabulary) or Llama-3.2-1B (``llmcore_cuda.testing.LLAMA_1B``), bf16, with a
generated word-level tokenizer. For each method: ``Engine(device="cuda", dtype="bfloat16",
quantization=M, max_num_seqs=1)``, a few seconds of warm-up, then the median of 3 greedy runs
of ``--new-tokens`` tokens after a ``--prompt-len`` prompt; decode tok/s excludes the first
token (the prefill), as in cuda_bench.py. Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path


def build(shape: str, root: Path) -> Path:
    from llmcore.testing.configs import SMOLLM2_135M
    from llmcore_cuda.testing import LLAMA_1B, make_model_folder

    path = root / shape
    if (path / "config.json").is_file():
        return path
    if shape == "smollm2":
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "tie_word_embeddings")
        kw = {k: SMOLLM2_135M[k] for k in keys}
        kw["max_position_embeddings"] = 4096
    else:
        kw = dict(LLAMA_1B)
    return make_model_folder(path, "llama", dtype="bfloat16", init_std=0.02, **kw)


def measure(folder: Path, method: str, prompt_len: int, n: int, warmup_s: float) -> dict:
    import torch

    from llmcore import SamplingParams
    from llmcore.engine.engine import Engine
    from llmcore.quantization.handler import weight_bytes

    q = None if method == "none" else method
    t0 = time.perf_counter()
    eng = Engine(model=str(folder), device="cuda", dtype="bfloat16", quantization=q, max_num_seqs=1,
                 max_model_len=prompt_len + n + 64, progress=False)
    start_s = time.perf_counter() - t0
    vocab = eng.model_config.vocab_size
    prompt = [(i * 7919) % (vocab - 3) + 3 for i in range(prompt_len)]

    def run(k: int) -> float:
        sp = SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = eng.generate([prompt], sp)
        torch.cuda.synchronize()
        assert len(out[0].outputs[0].token_ids) == k
        return time.perf_counter() - t

    tw = time.perf_counter()
    while time.perf_counter() - tw < warmup_s:
        run(n + 1)
    t_first = statistics.median(run(1) for _ in range(3))
    before = dict(eng.runner.stats)
    tf = statistics.median(run(n + 1) for _ in range(3))
    after = dict(eng.runner.stats)
    res = dict(method=method, decode_tok_s=round(n / (tf - t_first), 1), ttft_ms=round(t_first * 1e3, 2),
               weight_MB=round(weight_bytes(eng.runner.model) / 1e6, 1), graphs=sorted(eng.runner.graphs),
               start_s=round(start_s, 1), runner_stats={k: after[k] - before.get(k, 0) for k in after},
               device=torch.cuda.get_device_name(0))
    return res


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["smollm2", "llama1b"], default="smollm2")
    ap.add_argument("--methods", default="none,eetq,int4", help="comma-separated; none = bf16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--root", default="/tmp/llmcore-bench/quant")
    args = ap.parse_args()
    folder = build(args.shape, Path(args.root))
    for m in args.methods.split(","):
        res = measure(folder, m.strip(), args.prompt_len, args.new_tokens, args.warmup_s)
        print(json.dumps(dict(shape=args.shape, **res)), flush=True)
        gc.collect()  # the engine of the method before, and its GPU memory
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
