"""Shared fixtures: the embedded SmolLM2 and small random models, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, the CUDA plugin's Triton kernels, its runner and its conformance checks run on the
# CPU through Triton's interpreter, at small shapes (set before any kernel module imports triton).
# TRITON_INTERPRET=0 turns that off; on a GPU the kernels compile as usual.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm_dir():
    from llmcore.models.loader import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from llmcore.testing.models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("llama") / "m", arch="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from llmcore.testing.models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("qwen2") / "m", arch="qwen2", seed=2)


@pytest.fixture(scope="session")
def smol_engine(smollm_dir):
    """SmolLM2 in float32 (exact parity with transformers), shared by read-only tests."""
    from llmcore import Engine

    return Engine(model=str(smollm_dir), device="cpu", dtype="float32", progress=False,
                  kv_cache_memory=256 << 20)


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama):
    from llmcore import Engine

    return Engine(model=str(tiny_llama), device="cpu", dtype="float32", progress=False,
                  num_kv_blocks=256)


def hf_greedy(model_dir, prompt_ids, max_new_tokens, model_cache={}, **generate_kw):
    """Hugging Face transformers' greedy continuation (float32, batch of one, no padding).

    ``generate_kw`` go to ``generate`` (``repetition_penalty``, ``logits_processor``, ...).
    """
    import torch
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in model_cache:
        model_cache[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    model = model_cache[key]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **generate_kw)
    return out[0, len(prompt_ids):].tolist()


# ------------------------------------------------ Triton kernel tests (CUDA plugin, quantization)

#: CUDA-plugin tests that run on the CPU through Triton's interpreter (CI sets TRITON_INTERPRET=1)
interpreted_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the CUDA plugin on the CPU through Triton's interpreter: set TRITON_INTERPRET=1 (as CI does)",
)


def kernel_device() -> str:
    """Where Triton kernel tests run: an NVIDIA GPU, else Triton's CPU interpreter."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs an NVIDIA GPU (or TRITON_INTERPRET=1 for the kernel tests)")


def skip_large_when_interpreted(kdev: str, large: bool) -> None:
    """Skip a large kernel-test case under Triton's interpreter (CI runs the kernel tests there,
    within its time budget); the smaller cases of the same kernel and its masks still run."""
    if large and kdev == "cpu":
        pytest.skip("large case: runs on a GPU (Triton's interpreter runs this kernel's smaller cases)")


@pytest.fixture
def kdev(request):
    """The device for Triton kernel tests (tests/cuda, tests/quantization); skips without one."""
    import torch

    dev = kernel_device()
    pytest.importorskip("triton")
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if dev == "cpu" and any(v is torch.bfloat16 for v in params.values()):
        # Triton's interpreter truncates float32->bfloat16 and mis-computes bf16 dots
        pytest.skip("bfloat16 is not emulated correctly by Triton's interpreter")
    return dev
