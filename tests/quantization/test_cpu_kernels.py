"""AWQ packing and the CPU quantized linears against float64 references."""

from __future__ import annotations

import pytest
import torch

from llmcore.quantization.awq import Int4Linear, int4_linear_from_float
from llmcore.quantization.awq_format import (
    AWQ_ORDER, dequantize_awq, pack_awq, quantize_groups, quantize_groups_minmax, to_checkpoint, unpack_awq,
)
from llmcore.quantization.int8 import Int8Embedding, Int8Linear, quantize_int8


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's own packing loop (WQLinear_GEMM.from_linear), written out as the reference."""
    intweight = intweight.to(torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    return qweight


def test_packing_matches_autoawq_bit_for_bit():
    torch.manual_seed(0)
    values = torch.randint(0, 16, (24, 64), dtype=torch.int32)
    values[0, :8] = torch.arange(8) + 8  # high nibble set in the top word: negative int32
    packed = pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (24, 8)
    assert torch.equal(packed, autoawq_pack(values))
    assert torch.equal(unpack_awq(packed).to(torch.int32), values)
    # nibble i of word 0 holds column AWQ_ORDER[i]
    word = int(packed[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [8 + c for c in AWQ_ORDER]


def test_checkpoint_triple_dequantizes_to_the_group_formula():
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    q, scales, zeros = quantize_groups(w, 32)
    t = to_checkpoint(q, scales, zeros)
    assert (t["qweight"].shape, t["qzeros"].shape, t["scales"].shape) == ((128, 6), (4, 6), (4, 48))
    assert t["scales"].dtype == torch.float16
    expected = (q.float() - zeros.float().repeat_interleave(32, 1)) * scales.float().repeat_interleave(32, 1)
    assert torch.equal(dequantize_awq(t["qweight"], t["qzeros"], t["scales"], 32), expected)
    # round-to-nearest: every weight within half a step of its group's grid
    step = scales.float().repeat_interleave(32, 1)
    assert ((expected - w).abs() <= step * 0.5 + 1e-3).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_int4pack_linear_matches_float64(dtype, tol):
    torch.manual_seed(2)
    w = torch.randn(96, 256, dtype=torch.float64)
    q, scales, mins = quantize_groups_minmax(w, 64)
    ref_w = q.double() * scales.double().repeat_interleave(64, 1) + mins.double().repeat_interleave(64, 1)
    bias = torch.randn(96)
    layer = Int4Linear(q, scales.t(), mins.t(), 64, bias, dtype, "int4pack")
    x = torch.randn(5, 256, dtype=torch.float64)
    ref = x @ ref_w.t() + bias.double()
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == (5, 96)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol


def test_awq_zero_points_map_exactly_to_the_int4pack_offset():
    torch.manual_seed(3)
    w = torch.randn(32, 128)
    q, scales, zeros = quantize_groups(w, 32)
    t = to_checkpoint(q, scales, zeros)
    layer = Int4Linear.from_awq(t["qweight"], t["qzeros"], t["scales"], 32, None, torch.float32, "int4pack")
    x = torch.randn(3, 128, dtype=torch.float64)
    ref = x @ dequantize_awq(t["qweight"], t["qzeros"], t["scales"], 32).double().t()
    assert float((layer(x.float()).double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_int4_from_float_keeps_a_shape_the_kernel_cannot_take():
    odd = torch.nn.Linear(64, 40)  # 40 output rows: int4pack needs a multiple of 16
    assert int4_linear_from_float(odd, 32, torch.float32) is None
    ok = int4_linear_from_float(torch.nn.Linear(96, 48), 128, torch.float32)
    assert ok is not None and ok.group_size == 32 and ok.kernel == "int4pack"  # 128, 64 do not divide 96


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_int8_linear_matches_float64(dtype, tol):
    torch.manual_seed(4)
    lin = torch.nn.Linear(192, 80).double()
    q, s = quantize_int8(lin.weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    layer = Int8Linear(q, s, lin.bias, dtype)
    assert layer.kernel == "int8pack"
    x = torch.randn(4, 192, dtype=torch.float64)
    ref = x @ (q.double() * s.double()[:, None]).t() + lin.bias.detach()
    y = layer(x.to(dtype))
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol
    # per-channel int8: the weight itself within half a step
    assert ((q.double() * s.double()[:, None] - lin.weight.detach()).abs() <= s.double()[:, None] / 2 + 1e-7).all()


def test_int8_embedding_reads_the_shared_table():
    torch.manual_seed(5)
    table = torch.randn(50, 16)
    q, s = quantize_int8(table)
    head = Int8Linear(q, s, None, torch.float32)
    emb = Int8Embedding.shared_with(head, torch.float32)
    ids = torch.tensor([0, 7, 49])
    assert emb.weight.data_ptr() == head.weight.data_ptr()
    assert torch.allclose(emb(ids), q[ids].float() * s[ids, None])


def test_int8_linear_in_float32_uses_the_dense_gemm_in_row_chunks(monkeypatch):
    """float32 activations skip torch's int8pack op (a scalar loop for float32: ~1 ms per row
    at 1536 x 576); the weight is widened in chunks of DEQUANT_ROWS rows, same result."""
    import llmcore.quantization.int8 as int8

    torch.manual_seed(5)
    q = torch.randint(-127, 128, (50, 64), dtype=torch.int8)
    s = torch.rand(50) / 100
    bias = torch.randn(50)
    x = torch.randn(300, 64)
    ref = x.double() @ (q.double() * s.double()[:, None]).t() + bias.double()
    layer = Int8Linear(q, s, bias, torch.float32)
    calls = []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a))
    whole = layer(x)
    monkeypatch.setattr(int8, "DEQUANT_ROWS", 16)  # 50 rows: chunks of 16, 16, 16, 2
    chunked = layer(x)
    assert not calls
    assert float((whole.double() - ref).abs().max()) < 1e-4
    assert torch.allclose(chunked, whole, atol=1e-6)
