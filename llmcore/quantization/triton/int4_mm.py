"""``y = x @ W^T`` with ``W[n, k] = q[n, k] * scale[k // g, n] + offset[k // g, n]``, q 4-bit.

``qweight`` is AutoAWQ's GEMM layout: int32 ``[K, N / 8]``, nibble ``i`` of word
``j`` holds column ``8j + (0, 2, 4, 6, 1, 3, 5, 7)[i]``; so column ``n`` sits in
word ``n // 8`` at nibble ``(n % 8) // 2 + 4 * (n % 2)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 8


@triton.jit
def _dequant(qw_ptr, s_ptr, o_ptr, offs_k, offs_n, K, N, G, stride_qk, stride_sg):
    c = offs_n % 8
    shift = ((c // 2) + (c % 2) * 4) * 4
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    words = tl.load(qw_ptr + offs_k[:, None] * stride_qk + (offs_n // 8)[None, :], mask=mask, other=0)
    q = ((words >> shift[None, :]) & 0xF).to(tl.float32)
    grp = offs_k // G
    s = tl.load(s_ptr + grp[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + grp[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return q * s + o  # [BLOCK_K, BLOCK_N]


@triton.jit
def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, y_ptr, M, N, K, G,
                      stride_xm, stride_qk, stride_sg, stride_ym, K_PER_SPLIT,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequant(qw_ptr, s_ptr, o_ptr, offs_k, offs_n, K, N, G, stride_qk, stride_sg)
        acc += tl.sum(x[:, None] * w, axis=0)
    tl.atomic_add(y_ptr + row * stride_ym + offs_n, acc, mask=offs_n < N)


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, y_ptr, M, N, K, G,
                      stride_xm, stride_qk, stride_sg, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant(qw_ptr, s_ptr, o_ptr, offs_k, offs_n, K, N, G, stride_qk, stride_sg)
        if IEEE:  # float32 activations: no tf32 rounding
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:  # int8 / 4-bit codes times a scale are exact enough in fp16/bf16
            acc += tl.dot(x, w.to(x.dtype))
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _splits(k: int, block_k: int, programs: int, target: int = 256) -> int:
    """Split K so that about ``target`` programs run; each split a multiple of ``block_k``."""
    blocks = triton.cdiv(k, block_k)
    return max(1, min(blocks, target // max(programs, 1)))


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16/fp32) times the 4-bit weight -> ``[M, N]`` in x's dtype."""
    m, k = x.shape
    n = scales.shape[1]
    assert qweight.shape == (k, n // 8) and offsets.shape == scales.shape, "int4_mm: shapes do not match"
    x = x.contiguous()
    if m <= GEMV_MAX_ROWS:
        block_n, block_k = 64, 64
        n_blocks = triton.cdiv(n, block_n)
        splits = _splits(k, block_k, m * n_blocks)
        k_per_split = triton.cdiv(triton.cdiv(k, block_k), splits) * block_k
        splits = triton.cdiv(k, k_per_split)
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
        _int4_gemv_kernel[(m, n_blocks, splits)](
            x, qweight, scales, offsets, y, m, n, k, group_size,
            x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0), k_per_split,
            BLOCK_N=block_n, BLOCK_K=block_k,
        )
        return y.to(x.dtype)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = 32, 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](
        x, qweight, scales, offsets, y, m, n, k, group_size,
        x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
    )
    return y
