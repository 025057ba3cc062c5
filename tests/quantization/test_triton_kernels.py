"""Triton kernels for CUDA against a float64 reference.

Runs on an NVIDIA GPU; on a machine without one, only with TRITON_INTERPRET=1
and triton importable (Triton's CPU interpreter: slow, float32/float16 only).
Skipped cleanly otherwise.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmcore.quantization.awq_format import pack_awq, quantize_groups_minmax  # noqa: E402
from llmcore.quantization.int8 import quantize_int8  # noqa: E402


def dtypes_for(dev):
    # the interpreter mis-rounds bfloat16; a GPU runs all three
    return [torch.float32, torch.float16] + ([torch.bfloat16] if dev == "cuda" else [])


# (rows M, out N, in K, group): decode GEMV, a ragged N, GEMM with a partial row tile
SHAPES = [(1, 192, 256, 32), (3, 200, 128, 64), (40, 128, 384, 128)]


@pytest.mark.parametrize("m,n,k,g", SHAPES)
def test_int4_mm_matches_float64(kdev, m, n, k, g):
    from llmcore.quantization.triton.int4_mm import int4_mm

    torch.manual_seed(0)
    n8 = -(-n // 8) * 8
    w = torch.randn(n8, k, dtype=torch.float64)
    q, scales, mins = quantize_groups_minmax(w, g)
    ref_w = (q.double() * scales.double().repeat_interleave(g, 1) + mins.double().repeat_interleave(g, 1))
    for dtype in dtypes_for(kdev):
        x = torch.randn(m, k, dtype=torch.float64)
        ref = x @ ref_w.t()
        y = int4_mm(x.to(kdev, dtype), pack_awq(q.t()).to(kdev), scales.t().contiguous().to(kdev, dtype),
                    mins.t().contiguous().to(kdev, dtype), g)
        assert y.shape == (m, n8) and y.dtype == dtype
        # fp16/bf16 round x, scale and offset once each: error ~ eps * sqrt(K) * |x||w|
        tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
        rel = (y.double().cpu() - ref).abs().max() / ref.abs().max()
        assert rel < tol, (dtype, float(rel))


@pytest.mark.parametrize("m,n,k", [(1, 192, 256), (5, 100, 320), (33, 256, 512)])
def test_int8_mm_matches_float64(kdev, m, n, k):
    from llmcore.quantization.triton.int8_mm import int8_weight_only_mm

    torch.manual_seed(1)
    w = torch.randn(n, k, dtype=torch.float64)
    q, scale = quantize_int8(w)
    ref_w = q.double() * scale.double()[:, None]
    for dtype in dtypes_for(kdev):
        x = torch.randn(m, k, dtype=torch.float64)
        ref = x @ ref_w.t()
        y = int8_weight_only_mm(x.to(kdev, dtype), q.to(kdev), scale.to(kdev, dtype))
        assert y.shape == (m, n) and y.dtype == dtype
        tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
        rel = (y.double().cpu() - ref).abs().max() / ref.abs().max()
        assert rel < tol, (dtype, float(rel))


def test_quantized_linears_run_on_cuda():
    """Engine-free check of the CUDA module path: Int4Linear and Int8Linear pick Triton."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    pytest.importorskip("triton")
    from llmcore.quantization.awq import int4_linear_from_float
    from llmcore.quantization.int8 import Int8Linear

    torch.manual_seed(2)
    lin = torch.nn.Linear(256, 512, bias=True).cuda().to(torch.float16)
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    ref = lin(x).double()
    q4 = int4_linear_from_float(lin, 32, torch.float16)
    assert q4.kernel == "triton"
    q8 = Int8Linear.from_linear(lin, torch.float16)
    assert q8.kernel in ("triton", "eetq")
    scale = ref.abs().max()
    assert (q4(x).double() - ref).abs().max() / scale < 0.1
    assert (q8(x).double() - ref).abs().max() / scale < 0.02
