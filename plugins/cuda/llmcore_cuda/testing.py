"""Random model folders and CPU-side runners for the CUDA tests and benchmarks, with no downloaded files.

:func:`make_model_folder` is :func:`llmcore.testing.models.make_random_model`
with a generated word-level tokenizer covering the model's whole vocabulary
(the GPU image has no embedded SmolLM2 tokenizer, whose 49,152 tokens are
fewer than Llama's 128,256 anyway), GPU-sized defaults, and the weights drawn
on the GPU when there is one.

:func:`cpu_runner` builds the :class:`~llmcore_cuda.runner.CudaModelRunner` on
the CPU, where its Triton kernels run through Triton's interpreter
(``TRITON_INTERPRET=1``): CI checks the runner's forward, graph buckets and
overlapped decode without a GPU.

:func:`triton_compiles` records the Triton kernels compiled (or loaded from the disk cache) in
this process while it is open: after start-up's warm-up a workload should add none.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from llmcore.testing.models import make_random_model, write_wordlevel_tokenizer

__all__ = ["LLAMA_1B", "cpu_runner", "make_model_folder", "triton_compiles", "write_wordlevel_tokenizer"]

LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
)

INTERPRETED_SMS = 2

GPU_DEFAULTS = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
)


def make_model_folder(path: str | Path, arch: str = "llama", seed: int = 0, dtype: str = "float32",
                      init_std: float | None = 0.08, tokenizer: str = "words", **overrides: Any) -> Path:
    """A random Hugging Face folder (config, safetensors, generated tokenizer) built by transformers.

    ``tokenizer="words"`` (token i is the word ``t{i}``) or ``"bytes"`` (a byte-level BPE: any
    text encodes, as constrained decoding needs; keep ``vocab_size`` >= 512).
    """
    import torch

    return make_random_model(path, arch, seed, dtype, tokenizer=tokenizer, init_std=init_std,
                             build_device="cuda" if torch.cuda.is_available() else "cpu",
                             **{**GPU_DEFAULTS, **overrides})


def cpu_runner(model_config, folder, engine_config, dtype: str = "float32", *, block_size: int,
               max_model_len: int, eos_token_ids=(), quantization: str | None = None, seed: int = 0):
    """A :class:`~llmcore_cuda.runner.CudaModelRunner` on the CPU (its kernels interpreted).

    CUDA events, pinned memory and graphs are replaced by stand-ins on a CPU device
    (the runner's own), so everything but the capture itself runs as on a GPU. Call
    ``allocate_kv_cache`` next, as the engine does (it "captures" the decode buckets).
    """
    import torch

    from llmcore_cuda.runner import CudaModelRunner

    runner = CudaModelRunner(model_config, folder, torch.device("cpu"), dtype, block_size=block_size,
                             max_model_len=max_model_len, eos_token_ids=list(eos_token_ids),
                             engine_config=engine_config, seed=seed, progress=False, quantization=quantization)
    # split-K decode attention sizes its grid to the SMs: as if 2, batch 1 runs two slices and
    # larger batches one (both paths), where 8 would interpret four times the programs
    runner.num_sms = INTERPRETED_SMS
    return runner


@contextlib.contextmanager
def triton_compiles() -> Iterator[list[str]]:
    """Yield a list that collects ``"kernel[options](argument types)"`` for each Triton kernel
    specialization first used in this process inside the block (a compile, or a load from
    Triton's disk cache: either one the warm-up should have done). Nests over any hook already set."""
    from triton import knobs

    seen: list[str] = []
    before = knobs.runtime.jit_cache_hook

    def hook(*args: Any, **kwargs: Any):
        seen.append(str(kwargs.get("repr", kwargs.get("key", "?"))))
        return before(*args, **kwargs) if before is not None else None

    knobs.runtime.jit_cache_hook = hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_cache_hook = before
