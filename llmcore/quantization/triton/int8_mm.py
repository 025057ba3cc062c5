"""``y = (x @ q^T) * scale`` with ``q`` int8 ``[N, K]`` and one scale per output channel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 8


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, K_PER_SPLIT,
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
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.atomic_add(y_ptr + row * stride_ym + offs_n, acc * s, mask=offs_n < N)


@triton.jit
def _int8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
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
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0)
        if IEEE:  # float32 activations: no tf32 rounding
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:  # int8 / 4-bit codes times a scale are exact enough in fp16/bf16
            acc += tl.dot(x, w.to(x.dtype))
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def int8_weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` times int8 ``weight [N, K]`` with per-row ``scale [N]`` -> ``[M, N]`` in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and scale.shape == (n,), "int8_weight_only_mm: shapes do not match"
    x = x.contiguous()
    if m <= GEMV_MAX_ROWS:
        block_n, block_k = 64, 128
        n_blocks = triton.cdiv(n, block_n)
        k_blocks = triton.cdiv(k, block_k)
        splits = max(1, min(k_blocks, 256 // max(m * n_blocks, 1)))
        k_per_split = triton.cdiv(k_blocks, splits) * block_k
        splits = triton.cdiv(k, k_per_split)
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
        _int8_gemv_kernel[(m, n_blocks, splits)](
            x, weight, scale, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0), k_per_split,
            BLOCK_N=block_n, BLOCK_K=block_k,
        )
        return y.to(x.dtype)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = 32, 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_gemm_kernel[grid](
        x, weight, scale, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
    )
    return y
