"""Shared fixtures: the embedded SmolLM2 and small random models, built once per session."""

from __future__ import annotations

import os

# OpenMP threads (torch's and the native decode step's) sleep when idle instead of spinning: on a
# small or shared CI machine a spinning thread takes the core the working one needs, and a batch of
# SmolLM2 steps measured 10-17x slower with another process busy on one of 2 cores. Read once,
# when libgomp loads (the first `import torch`); server and worker processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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


# ------------------------------------------------ pytest-xdist (the README's command runs `-n 2`)

#: test paths that share an expensive session fixture: one worker runs them all, so it is built once
#: (compiled_tiny: about 70 s of AOT compile; the `server` fixtures: a server process and its engines)
XDIST_SHARED = {
    "tests/compile/": "compiled_tiny", "tests/static/": "compiled_tiny",
    "tests/kserve/": "kserve server",
    **{f"tests/server/{name}.py": "openai server"
       for name in ("test_chat_page", "test_http_errors", "test_load", "test_openai_client")},
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n N`` (``--dist load``): a test module is one unit of work, so its module-scoped fixtures
    (a server, engines) are built once, on one worker; the modules under a path of
    :data:`XDIST_SHARED` form one unit. Units go out in collection order, the long ones (compile,
    the CUDA plugin through Triton's interpreter) first and many short ones last, which keeps the
    two workers' ends close. (``--dist loadgroup`` would do the grouping, but pytest-xdist 3.8
    marks the group in ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return next((group for prefix, group in XDIST_SHARED.items() if path.startswith(prefix)), path)

    config.option.loadscopereorder = False  # collection order, not "most tests first"
    return ModuleScheduling(config, log)
