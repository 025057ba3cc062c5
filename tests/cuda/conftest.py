"""CUDA tests run on an NVIDIA GPU; without one they skip cleanly.

Kernel tests also run on the CPU through Triton's interpreter when
``TRITON_INTERPRET=1`` is set and triton is importable (slow; for development).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")


def kernel_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs an NVIDIA GPU (or TRITON_INTERPRET=1 for the kernel tests)")


@pytest.fixture
def kdev(request):
    dev = kernel_device()
    pytest.importorskip("triton")
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if dev == "cpu" and any(v is torch.bfloat16 for v in params.values()):
        # Triton's interpreter truncates float32->bfloat16 and mis-computes bf16 dots
        pytest.skip("bfloat16 is not emulated correctly by Triton's interpreter")
    return dev


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    pytest.importorskip("triton")
    return "cuda"
