"""AutoAWQ's GEMM checkpoint layout: packing, unpacking, round-to-nearest group quantization.

For a linear layer with weight ``W [N out, K in]`` and group size ``g``, AutoAWQ
stores (``version: "gemm"``):

* ``qweight`` int32 ``[K, N / 8]``: eight 4-bit values per int32 along the
  output dimension; nibble ``i`` (bits ``4i..4i+3``) of word ``j`` holds output
  column ``8j + AWQ_ORDER[i]``;
* ``qzeros`` int32 ``[K / g, N / 8]``: the zero points, packed the same way;
* ``scales`` float16 ``[K / g, N]``.

and ``W[n, k] = (q[k, n] - zero[k // g, n]) * scale[k // g, n]``.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` ints in 0..15 -> ``[rows, cols / 8]`` int32 in AutoAWQ's order."""
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 values per int32 along the output dimension; {cols} is not a multiple of 8")
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    packed = (v << _SHIFTS.to(v.device)).sum(-1)  # nibbles do not overlap: sum == bitwise or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement int32
    return packed.to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: ``[rows, cols / 8]`` int32 -> ``[rows, cols]`` uint8 in 0..15."""
    rows, words = packed.shape
    nibbles = (packed.to(torch.int64)[..., None] >> _SHIFTS.to(packed.device)) & 0xF
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(rows, words * 8).to(torch.uint8)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """The float32 weight ``[N, K]`` an AWQ triple stands for."""
    q = unpack_awq(qweight).float()  # [K, N]
    z = unpack_awq(qzeros).float().repeat_interleave(group_size, 0)
    s = scales.float().repeat_interleave(group_size, 0)
    return ((q - z) * s).t().contiguous()


def quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit round-to-nearest per group of ``group_size`` input channels.

    Returns ``(q [N, K] uint8 0..15, scales [N, K/g] float16, zeros [N, K/g] uint8)``,
    AutoAWQ's recipe: scale = (max - min) / 15, zero = round(-min / scale). The
    codes are computed with the float16-rounded scales the checkpoint will hold.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    mx, mn = w.amax(-1), w.amin(-1)
    scales = ((mx - mn).clamp(min=1e-5) / 15).to(torch.float16)
    s = scales.float()
    zeros = torch.round(-mn / s).clamp(0, 15)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), scales, zeros.to(torch.uint8)


def quantize_groups_minmax(weight: torch.Tensor, group_size: int,
                           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit min/max per group with a float offset (llama.cpp's Q4_1 recipe).

    Returns ``(q [N, K] uint8, scales [N, K/g], mins [N, K/g])`` with
    ``W ~= q * scale + min``; scales and mins are rounded to ``dtype`` (what the
    kernel stores) before the codes are chosen.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    mn = w.amin(-1).to(dtype).float()
    scales = ((w.amax(-1) - mn).clamp(min=1e-6) / 15).to(dtype).float()
    q = torch.round((w - mn[..., None]) / scales[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), scales, mn


def to_checkpoint(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """``qweight``/``qzeros``/``scales`` tensors (AutoAWQ GEMM) from :func:`quantize_groups` output."""
    return {
        "qweight": pack_awq(q.t()),
        "qzeros": pack_awq(zeros.t()),
        "scales": scales.t().contiguous().to(torch.float16),
    }


def pick_group_size(in_features: int, preferred: int = 128) -> int | None:
    """``preferred`` if it divides ``in_features``, else the largest of 64, 32 that does."""
    for g in (preferred, 64, 32):
        if g <= in_features and in_features % g == 0:
            return g
    return None
