"""CUDA tests run on an NVIDIA GPU; without one they skip cleanly.

The kernel tests, the runner tests ``*_interpreted.py`` and the CUDA conformance
checks also run on the CPU through Triton's interpreter when ``TRITON_INTERPRET=1``
is set and triton is importable, as in CI (the larger kernel cases stay on the GPU:
``tests.conftest.skip_large_when_interpreted``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    pytest.importorskip("triton")
    return "cuda"
