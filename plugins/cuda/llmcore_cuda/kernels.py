"""Triton kernels for the CUDA runner.

(Over 450 lines on purpose: every Triton kernel of the runner and its launch helper sit together,
so the shapes, block sizes and masks they share are read in one place.)

Imported lazily (only when a CUDA runner is built or a GPU test runs): importing
``llmcore_cuda`` never needs triton.

KV cache layout (shared with the core): per layer ``k_cache``/``v_cache`` of
shape ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous; the
token at position ``p`` of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

Kernels:

* :func:`add_rmsnorm` -- residual add + RMSNorm in one pass (HF rounding order).
* :func:`rope_and_cache` -- (optional Qwen3 q/k RMSNorm), rotary embedding of q
  and k, and the write of k/v into their cache slots, one program per token.
* :func:`silu_mul` -- ``silu(gate) * up`` from the fused gate_up projection.
* :func:`decode_attention` -- one query per sequence against its paged context;
  split-K ("flash decoding"): ``num_splits`` programs per (sequence, KV head)
  each reduce one slice of the context, a second kernel merges the slices by
  their log-sum-exp. All query heads of a GQA group share each K/V load.
* :func:`gemv` -- one decode row times a weight (batch 1): whole weight tiles loaded before
  the grid-dependency wait (programmatic dependent launch), optionally persistent, split-K,
  gated (SiLU*up) or taking the previous GEMM's output with residual add + RMSNorm fused.
* :func:`prefill_attention` -- variable-length queries (chunked prefill, prefix
  cache hits, mixed prefill+decode batches): query ``j`` of a sequence sits at
  position ``ctx - qlen + j`` and attends to cached keys ``0 .. ctx - qlen + j``,
  all read through the block table (new K/V are written to the cache first).

Elementwise kernels follow transformers' order of operations and roundings
(RMSNorm rounds the normalized value before the weight, RoPE and SiLU*up round
each product) so greedy output tracks HF closely; Triton's compiler may still
contract a multiply-add, so a RoPE output can differ from torch's by one
rounding of its products. Accumulations are in float32; with float32 inputs,
dots use IEEE float32 (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DOT_F32 = "ieee"


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ------------------------------------------------- programmatic dependent launch

# Kernels called with ``pdl=True`` are launched with CUDA's programmatic stream serialization
# (Hopper+): such a launch may start while the previous kernel in the stream still runs. Each
# of these kernels first does what depends on no earlier kernel (loading its weight tile, the
# block table, cached K/V), then waits (``griddepcontrol.wait``: the previous grid has completed
# and its writes are visible) before it reads activations or writes anything, and signals
# (``griddepcontrol.launch_dependents``) that the next kernel may start its own prologue. Inside
# a CUDA graph this overlaps one kernel's weight streaming with the previous one's tail.
# Correctness needs every PDL-launched kernel to wait before its first dependent access; it
# does not need the previous kernel to be PDL-aware (one that never signals releases its
# dependents when it exits).


def pdl_supported(device=None) -> bool:
    """Programmatic dependent launch: a real CUDA device of compute capability >= 9.0."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    if os.environ.get("LLMCORE_CUDA_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _pdl_kw(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _pdl_wait(PDL: tl.constexpr, EARLY: tl.constexpr):
    """Wait for the previous grid; signal dependents before (``EARLY``) or after the wait."""
    if PDL:
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if not EARLY:
            tl.extra.cuda.gdc_launch_dependents()


# --------------------------------------------------------------------- norms


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _pdl_wait(PDL, True)
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * N + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (w * y).to(x.dtype), mask=mask)


def add_rmsnorm(x, residual, weight, eps, out=None, pdl=False):
    """``residual += x`` (if given) then ``out = rmsnorm(residual) * weight``.

    Returns ``(out, new_residual)``. Without ``residual`` the new residual is ``x``.
    The residual is updated in place.
    """
    assert x.is_contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    if out is None:
        out = torch.empty_like(x)
    has_res = residual is not None
    if has_res:
        assert residual.is_contiguous() and residual.shape == x.shape
    block = _next_pow2(n)
    _add_rmsnorm_kernel[(rows,)](
        x, residual if has_res else x, weight, out, residual if has_res else x, n, eps,
        HAS_RES=has_res, BLOCK=block, PDL=pdl, num_warps=min(16, max(1, block // 256)), **_pdl_kw(pdl),
    )
    return out, (residual if has_res else x)


# ----------------------------------------------------------- rope + KV write


@triton.jit
def _rope_pair(x1, x2, c1, s1, c2, s2, DT: tl.constexpr):
    # transformers: q * cos + rotate_half(q) * sin, each product rounded to the model dtype
    a1 = (x1 * c1).to(DT).to(tl.float32)
    b1 = (x2 * s1).to(DT).to(tl.float32)
    a2 = (x2 * c2).to(DT).to(tl.float32)
    b2 = (x1 * s2).to(DT).to(tl.float32)
    return (a1 - b1).to(DT), (a2 + b2).to(DT)


@triton.jit
def _head_rmsnorm(x1, x2, w_ptr, d, dm, eps, HALF: tl.constexpr, D: tl.constexpr, DT: tl.constexpr):
    var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D
    r = tl.rsqrt(var + eps)[:, None]
    w1 = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    y1 = (w1 * (x1 * r).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    y2 = (w2 * (x2 * r).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    return y1, y2


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    qn_ptr, kn_ptr, eps, qkv_stride, pos_stride, slot_stride,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    DT = q_out_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t * pos_stride).to(tl.int64)
    slot = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dm = d < HALF
    c1 = tl.load(cos_ptr + pos * D + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * D + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * D + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * D + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    base = qkv_ptr + t * qkv_stride

    # q heads
    h = tl.arange(0, BLOCK_H)
    m = (h < H)[:, None] & dm[None, :]
    qp = base + h[:, None] * D + d[None, :]
    q1 = tl.load(qp, mask=m, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=m, other=0.0).to(tl.float32)
    if QK_NORM:
        q1, q2 = _head_rmsnorm(q1, q2, qn_ptr, d, dm, eps, HALF, D, DT)
    o1, o2 = _rope_pair(q1, q2, c1, s1, c2, s2, DT)
    op = q_out_ptr + t * (H * D) + h[:, None] * D + d[None, :]
    tl.store(op, o1, mask=m)
    tl.store(op + HALF, o2, mask=m)

    # k heads -> cache
    kh = tl.arange(0, BLOCK_KVH)
    km = (kh < KVH)[:, None] & dm[None, :]
    kp = base + H * D + kh[:, None] * D + d[None, :]
    k1 = tl.load(kp, mask=km, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=km, other=0.0).to(tl.float32)
    if QK_NORM:
        k1, k2 = _head_rmsnorm(k1, k2, kn_ptr, d, dm, eps, HALF, D, DT)
    r1, r2 = _rope_pair(k1, k2, c1, s1, c2, s2, DT)
    cp = slot * (KVH * D) + kh[:, None] * D + d[None, :]
    tl.store(k_cache_ptr + cp, r1, mask=km)
    tl.store(k_cache_ptr + cp + HALF, r2, mask=km)
    # v heads -> cache (two halves, same masks)
    vp = base + (H + KVH) * D + kh[:, None] * D + d[None, :]
    tl.store(v_cache_ptr + cp, tl.load(vp, mask=km, other=0.0), mask=km)
    tl.store(v_cache_ptr + cp + HALF, tl.load(vp + HALF, mask=km, other=0.0), mask=km)


def rope_and_cache(qkv, positions, slot_mapping, cos, sin, k_cache, v_cache, num_heads, num_kv_heads,
                   head_dim, q_out=None, q_norm=None, k_norm=None, eps=1e-6):
    """Rotate q/k of ``qkv`` ([T, (H + 2 KVH) * D]) and store k/v in their cache slots.

    Returns the rotated queries ``[T, H, D]``. ``positions``/``slot_mapping`` may be
    strided 1-D views (any integer dtype).
    """
    t = qkv.shape[0]
    assert qkv.stride(-1) == 1 and head_dim % 2 == 0
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    if q_out is None:
        q_out = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q_out
    half = head_dim // 2
    qk_norm = q_norm is not None
    _rope_cache_kernel[(t,)](
        qkv, positions, slot_mapping, cos, sin, q_out, k_cache, v_cache,
        q_norm if qk_norm else cos, k_norm if qk_norm else cos, eps,
        qkv.stride(0), positions.stride(0), slot_mapping.stride(0),
        H=num_heads, KVH=num_kv_heads, D=head_dim, HALF=half,
        BLOCK_H=_next_pow2(num_heads), BLOCK_KVH=_next_pow2(num_kv_heads), BLOCK_HALF=_next_pow2(half),
        QK_NORM=qk_norm, num_warps=4,
    )
    return q_out


# ------------------------------------------------------------------- SiLU*up


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    g = tl.load(x_ptr + row * 2 * I + offs, mask=m, other=0.0)
    u = tl.load(x_ptr + row * 2 * I + I + offs, mask=m, other=0.0)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * I + offs, (a * u.to(tl.float32)).to(g.dtype), mask=m)


def silu_mul(x, out=None):
    """``silu(x[:, :I]) * x[:, I:]`` for the fused gate_up output ``x`` [T, 2I]."""
    assert x.is_contiguous()
    t, two_i = x.shape
    i = two_i // 2
    if out is None:
        out = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(i, block))](x, out, i, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------- decode attention


@triton.jit
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, pacc_ptr, plse_ptr, seq_ptr, qstart_ptr,
    scale, q_stride, bt_stride, ctx_stride,
    H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, MAPPED: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if MAPPED:  # row b is sequence seq[b] of a mixed batch, its query at flat row qstart[seq]
        sq = tl.load(seq_ptr + b).to(tl.int64)
        qrow = tl.load(qstart_ptr + sq).to(tl.int64)
    else:
        sq = b
        qrow = b
    ctx = tl.load(ctx_ptr + sq * ctx_stride)
    per = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, ctx)

    g = tl.arange(0, BLOCK_G)
    gm = g < G
    dd = tl.arange(0, BLOCK_D)
    dm = dd < D
    heads = kvh * G + g
    q = tl.load(q_ptr + qrow * q_stride + heads[:, None] * D + dd[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        tm = t < end
        blk = tl.load(bt_ptr + sq * bt_stride + t // BS, mask=tm, other=0).to(tl.int64)
        off = (blk * BS + t % BS) * (KVH * D) + kvh * D
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(k_ptr + off[:, None] + dd[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + off[:, None] + dd[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(tm[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    denom = tl.where(l_i > 0, l_i, 1.0)
    o = acc / denom[:, None]
    om = gm[:, None] & dm[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + qrow * (H * D) + heads[:, None] * D + dd[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=om)
    else:
        row = (b * H + heads) * NUM_SPLITS + split
        tl.store(pacc_ptr + row[:, None] * BLOCK_D + dd[None, :], o, mask=om)
        lse = tl.where(l_i > 0, m_i + tl.log(denom), float("-inf"))
        tl.store(plse_ptr + row, lse, mask=gm)


@triton.jit
def _decode_reduce_kernel(
    pacc_ptr, plse_ptr, out_ptr, seq_ptr, qstart_ptr, H: tl.constexpr, D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, MAPPED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    _pdl_wait(PDL, True)
    if MAPPED:
        qrow = tl.load(qstart_ptr + tl.load(seq_ptr + b).to(tl.int64)).to(tl.int64)
    else:
        qrow = b
    s = tl.arange(0, BLOCK_S)
    sm = s < NUM_SPLITS
    dd = tl.arange(0, BLOCK_D)
    dm = dd < D
    row = (b * H + h) * NUM_SPLITS + s
    lse = tl.load(plse_ptr + row, mask=sm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx > float("-inf"), mx, 0.0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - mx), 0.0)
    acc = tl.load(pacc_ptr + row[:, None] * BLOCK_D + dd[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    tot = tl.sum(w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out_ptr + qrow * (H * D) + h * D + dd, o.to(out_ptr.dtype.element_ty), mask=dm)


def decode_workspace(batch: int, num_heads: int, head_dim: int, num_splits: int, device):
    """Scratch for split-K partials: (acc [B*H*S, BLOCK_D] f32, lse [B*H*S] f32)."""
    bd = _next_pow2(head_dim)
    n = max(batch * num_heads * num_splits, 1)
    return (torch.empty((n, bd), dtype=torch.float32, device=device),
            torch.empty((n,), dtype=torch.float32, device=device))


def decode_block_n(block_size: int) -> int:
    return max(32, block_size)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, block_size: int,
                      num_sms: int, max_splits: int = 32) -> int:
    """Enough programs to cover the SMs twice, no more slices than context tiles."""
    bn = decode_block_n(block_size)
    progs = max(batch * num_kv_heads, 1)
    want = _next_pow2(max(1, (2 * num_sms + progs - 1) // progs))
    tiles = max(1, -(-max_context // bn))
    return int(max(1, min(want, max_splits, _next_pow2(tiles))))


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=1,
                     out=None, workspace=None, seq_map=None, query_starts=None):
    """Attention of one query per sequence (``q`` [B, H, D]) over its paged context.

    ``block_tables`` [B, W] and ``context_lens`` [B] may be strided int32/int64 views;
    ``context_lens`` counts the tokens in the cache, the new one included (0 = padding row,
    output 0).

    Mixed batches: with ``seq_map`` [R] (the decode sequences) and ``query_starts`` [S+1],
    row ``r`` is sequence ``seq_map[r]``, whose single query (and output) is flat row
    ``query_starts[seq_map[r]]`` of ``q``/``out`` ([T, H, D]); tables and lengths are per sequence.
    """
    mapped = seq_map is not None
    bsz = seq_map.shape[0] if mapped else q.shape[0]
    h, d = q.shape[1], q.shape[2]
    _, bs, kvh, _ = k_cache.shape
    assert q.stride(2) == 1 and q.stride(1) == d
    assert block_tables.stride(1) == 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    g = h // kvh
    bd = _next_pow2(d)
    if num_splits > 1 and workspace is None:
        workspace = decode_workspace(bsz, h, d, num_splits, q.device)
    pacc, plse = workspace if num_splits > 1 else (out, out)
    ieee = q.dtype == torch.float32
    smap = seq_map if mapped else context_lens
    qst = query_starts if mapped else context_lens
    _decode_attn_kernel[(bsz, kvh, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, pacc, plse, smap, qst,
        scale, q.stride(0), block_tables.stride(0), context_lens.stride(0),
        H=h, KVH=kvh, G=g, D=d, BS=bs, BLOCK_G=max(16, _next_pow2(g)), BLOCK_D=bd,
        BLOCK_N=decode_block_n(bs), NUM_SPLITS=num_splits, IEEE=ieee, MAPPED=mapped,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(bsz, h)](
            pacc, plse, out, smap, qst, H=h, D=d, NUM_SPLITS=num_splits, BLOCK_S=_next_pow2(num_splits),
            BLOCK_D=bd, MAPPED=mapped, num_warps=2,
        )
    return out


# ------------------------------------- decode attention with RoPE + KV write fused


@triton.jit
def _decode_attn_rope_kernel(
    qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, eps,
    k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, pacc_ptr, plse_ptr,
    scale, qkv_stride, pos_stride, slot_stride, bt_stride, ctx_stride,
    H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, QK_NORM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Decode attention reading q/k/v straight from the qkv projection.

    Every program rotates its GQA group's queries and the new key itself; the
    split-0 program writes the new K/V into the cache, and the program whose slice
    holds the new position uses them from registers (nobody reads that cache slot
    in this launch, so there is no race).

    The loop is software-pipelined: each iteration loads the next tile of cached K/V
    before it computes on the current one. With ``PDL`` the first tile (the metadata,
    block table and cached K/V, none written by the qkv GEMM before it) is loaded
    before the grid-dependency wait, overlapping the previous kernel.
    """
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    DT = k_ptr.dtype.element_ty
    ctx = tl.load(ctx_ptr + b * ctx_stride)
    last = ctx - 1
    per = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, ctx)
    has_new = (start <= last) & (last < end)
    loop_end = tl.minimum(end, last)

    pos = tl.load(pos_ptr + b * pos_stride).to(tl.int64)
    slot = tl.load(slot_ptr + b * slot_stride).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dm = d < HALF
    dd = tl.arange(0, BLOCK_D)
    ddm = dd < D
    c1 = tl.load(cos_ptr + pos * D + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * D + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * D + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * D + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    # first tile of cached K/V (positions < last: written by earlier steps)
    t = start + tl.arange(0, BLOCK_N)
    tm = t < loop_end
    blk = tl.load(bt_ptr + b * bt_stride + t // BS, mask=tm, other=0).to(tl.int64)
    off = (blk * BS + t % BS) * (KVH * D) + kvh * D
    hm = tm[:, None] & dm[None, :]
    ka = tl.load(k_ptr + off[:, None] + d[None, :], mask=hm, other=0.0)
    kb = tl.load(k_ptr + off[:, None] + HALF + d[None, :], mask=hm, other=0.0)
    v = tl.load(v_ptr + off[:, None] + dd[None, :], mask=tm[:, None] & ddm[None, :], other=0.0)
    _pdl_wait(PDL, True)

    base = qkv_ptr + b * qkv_stride
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    heads = kvh * G + g
    qm = gm[:, None] & dm[None, :]
    qp = base + heads[:, None] * D + d[None, :]
    q1 = tl.load(qp, mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=qm, other=0.0).to(tl.float32)
    if QK_NORM:
        q1, q2 = _head_rmsnorm(q1, q2, qn_ptr, d, dm, eps, HALF, D, DT)
    q1, q2 = _rope_pair(q1, q2, c1, s1, c2, s2, DT)
    q1 = tl.where(qm, q1, 0.0)
    q2 = tl.where(qm, q2, 0.0)
    # the new key (rotated) and value of this KV head, as [1, HALF] rows
    kp = base + H * D + kvh * D + d[None, :]
    k1 = tl.load(kp, mask=dm[None, :], other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=dm[None, :], other=0.0).to(tl.float32)
    if QK_NORM:
        k1, k2 = _head_rmsnorm(k1, k2, kn_ptr, d, dm, eps, HALF, D, DT)
    k1, k2 = _rope_pair(k1, k2, c1, s1, c2, s2, DT)
    vn = tl.load(base + (H + KVH) * D + kvh * D + dd, mask=ddm, other=0.0)
    wmask = (split == 0) & (ctx > 0)
    cp = slot * (KVH * D) + kvh * D
    tl.store(k_ptr + cp + d[None, :], k1, mask=dm[None, :] & wmask)
    tl.store(k_ptr + cp + HALF + d[None, :], k2, mask=dm[None, :] & wmask)
    tl.store(v_ptr + cp + dd, vn, mask=ddm & wmask)

    s_new = (tl.sum(q1.to(DT).to(tl.float32) * k1.to(tl.float32), axis=1)
             + tl.sum(q2.to(DT).to(tl.float32) * k2.to(tl.float32), axis=1)) * scale
    m_i = tl.where(has_new, s_new, float("-inf"))
    l_i = tl.where(has_new, 1.0, 0.0) + tl.zeros([BLOCK_G], tl.float32)
    acc = tl.where(has_new, 1.0, 0.0) * vn.to(tl.float32)[None, :] + tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    qa = q1.to(DT)
    qb = q2.to(DT)
    for n0 in range(start, loop_end, BLOCK_N):
        tm = (n0 + tl.arange(0, BLOCK_N)) < loop_end
        if IEEE:
            sc = tl.dot(qa, tl.trans(ka), input_precision="ieee") + tl.dot(qb, tl.trans(kb), input_precision="ieee")
        else:
            sc = tl.dot(qa, tl.trans(ka)) + tl.dot(qb, tl.trans(kb))
        sc = tl.where(tm[None, :], sc * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
        m_i = m_new
        # next tile (all masked past the slice: no memory traffic)
        t = n0 + BLOCK_N + tl.arange(0, BLOCK_N)
        tm = t < loop_end
        blk = tl.load(bt_ptr + b * bt_stride + t // BS, mask=tm, other=0).to(tl.int64)
        off = (blk * BS + t % BS) * (KVH * D) + kvh * D
        hm = tm[:, None] & dm[None, :]
        ka = tl.load(k_ptr + off[:, None] + d[None, :], mask=hm, other=0.0)
        kb = tl.load(k_ptr + off[:, None] + HALF + d[None, :], mask=hm, other=0.0)
        v = tl.load(v_ptr + off[:, None] + dd[None, :], mask=tm[:, None] & ddm[None, :], other=0.0)
    denom = tl.where(l_i > 0, l_i, 1.0)
    o = acc / denom[:, None]
    om = gm[:, None] & ddm[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * (H * D) + heads[:, None] * D + dd[None, :], o.to(DT), mask=om)
    else:
        row = (b * H + heads) * NUM_SPLITS + split
        tl.store(pacc_ptr + row[:, None] * BLOCK_D + dd[None, :], o, mask=om)
        lse = tl.where(l_i > 0, m_i + tl.log(denom), float("-inf"))
        tl.store(plse_ptr + row, lse, mask=gm)


def decode_attention_rope(qkv, positions, slot_mapping, cos, sin, k_cache, v_cache, block_tables,
                          context_lens, num_heads, scale, num_splits=1, workspace=None, out=None,
                          q_norm=None, k_norm=None, eps=1e-6, pdl=False):
    """RoPE + KV-cache write + decode attention in one launch (plus the split merge).

    ``qkv`` [B, (H + 2 KVH) * D] straight from the projection; returns ``[B, H, D]``.
    Same semantics as :func:`rope_and_cache` followed by :func:`decode_attention`.
    """
    bsz = qkv.shape[0]
    _, bs, kvh, d = k_cache.shape
    h = num_heads
    assert qkv.stride(1) == 1 and block_tables.stride(1) == 1 and d % 2 == 0
    if out is None:
        out = torch.empty((bsz, h, d), dtype=k_cache.dtype, device=qkv.device)
    if bsz == 0:
        return out
    half = d // 2
    bd = _next_pow2(d)
    if num_splits > 1 and workspace is None:
        workspace = decode_workspace(bsz, h, d, num_splits, qkv.device)
    pacc, plse = workspace if num_splits > 1 else (out, out)
    qk_norm = q_norm is not None
    _decode_attn_rope_kernel[(bsz, kvh, num_splits)](
        qkv, positions, slot_mapping, cos, sin, q_norm if qk_norm else cos, k_norm if qk_norm else cos, eps,
        k_cache, v_cache, block_tables, context_lens, out, pacc, plse,
        scale, qkv.stride(0), positions.stride(0), slot_mapping.stride(0), block_tables.stride(0),
        context_lens.stride(0),
        H=h, KVH=kvh, G=h // kvh, D=d, HALF=half, BS=bs, BLOCK_G=max(16, _next_pow2(h // kvh)),
        BLOCK_HALF=max(16, _next_pow2(half)), BLOCK_D=bd, BLOCK_N=decode_block_n(bs),
        NUM_SPLITS=num_splits, IEEE=k_cache.dtype == torch.float32, QK_NORM=qk_norm, PDL=pdl,
        num_warps=4, num_stages=2, **_pdl_kw(pdl),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(bsz, h)](
            pacc, plse, out, context_lens, context_lens, H=h, D=d, NUM_SPLITS=num_splits,
            BLOCK_S=_next_pow2(num_splits), BLOCK_D=bd, MAPPED=False, PDL=pdl, num_warps=2, **_pdl_kw(pdl),
        )
    return out


# ------------------------------------------- skinny GEMM for small decode batches


@triton.jit
def _load_act(a_ptr, r_ptr, m, k, mk_mask, M, K, a_part_stride,
              A_PARTS: tl.constexpr, HAS_RES: tl.constexpr, DT: tl.constexpr):
    """Activation chunk [BLOCK_M, BLOCK_K] as float32 of model-dtype values: the sum of
    ``A_PARTS`` float32 split-K partials (rounded like a GEMM output), plus the residual."""
    off = m[:, None] * K + k[None, :]
    if A_PARTS == 1:
        a = tl.load(a_ptr + off, mask=mk_mask, other=0.0).to(tl.float32)
    else:
        a = tl.load(a_ptr + off, mask=mk_mask, other=0.0)
        for p in tl.static_range(1, A_PARTS):
            a += tl.load(a_ptr + p * a_part_stride + off, mask=mk_mask, other=0.0)
        a = a.to(DT).to(tl.float32)
    if HAS_RES:
        a = (a + tl.load(r_ptr + off, mask=mk_mask, other=0.0).to(tl.float32)).to(DT).to(tl.float32)
    return a


@triton.jit
def _small_gemm_kernel(
    a_ptr, r_ptr, r_out_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, eps, a_part_stride,
    A_PARTS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, WRITE_RES: tl.constexpr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    DT = w_ptr.dtype.element_ty
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_len
    k_hi = tl.minimum(k_lo + k_len, K)
    if NORM:
        ss = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = _load_act(a_ptr, r_ptr, m, k, mm[:, None] & (k < K)[None, :], M, K, a_part_stride,
                          A_PARTS, HAS_RES, DT)
            ss += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if GATED:
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < k_hi
        mk = mm[:, None] & km[None, :]
        x = _load_act(a_ptr, r_ptr, m, k, mk, M, K, a_part_stride, A_PARTS, HAS_RES, DT)
        if WRITE_RES:
            tl.store(r_out_ptr + m[:, None] * K + k[None, :], x.to(DT), mask=mk & (pid_n == 0))
        if NORM:
            nw = tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32)
            x = (nw[None, :] * (x * rstd[:, None]).to(DT).to(tl.float32)).to(DT)
        else:
            x = x.to(DT)
        wm = nm[:, None] & km[None, :]
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=wm, other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
        if GATED:
            w2 = tl.load(w_ptr + (n[:, None] + N).to(tl.int64) * K + k[None, :], mask=wm, other=0.0)
            if IEEE:
                acc2 += tl.dot(x, tl.trans(w2), input_precision="ieee")
            else:
                acc2 += tl.dot(x, tl.trans(w2))
    if HAS_BIAS:
        first = (pid_k == 0).to(tl.float32)
        acc += first * tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc2 += first * tl.load(bias_ptr + N + n, mask=nm, other=0.0).to(tl.float32)[None, :]
    om = mm[:, None] & nm[None, :]
    if SPLIT_K == 1:
        if GATED:
            gt = acc.to(DT).to(tl.float32)
            up = acc2.to(DT).to(tl.float32)
            act = (gt / (1.0 + tl.exp(-gt))).to(DT).to(tl.float32)
            y = (act * up).to(DT)
        else:
            y = acc.to(DT)
        tl.store(out_ptr + m[:, None] * N + n[None, :], y, mask=om)
    else:
        tl.store(out_ptr + pid_k * (M * N) + m[:, None] * N + n[None, :], acc, mask=om)


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per weight shape (N, K, gated);
# tuned on an H200 by benchmarks/cuda_bench.py's roofline phase, else a heuristic
GEMM_CONFIGS: dict[tuple[int, int, bool], tuple[int, int, int, int, int]] = {
    # Llama-1B shapes, measured on an H200 (benchmarks/cuda_bench.py, roofline phase): Triton
    # split-K beats cuBLAS for o (4.7 vs 6.0 us) and down (10.7 vs 14.1 us); the gated
    # gate_up GEMM with SiLU*up fused beats cuBLAS + the SiLU kernel (18.3 vs 20.1 us).
    (2048, 2048, False): (32, 128, 4, 4, 4),
    (2048, 8192, False): (32, 256, 4, 4, 3),
    (8192, 2048, True): (32, 128, 1, 4, 4),
}


def load_gemm_configs(text: str | None = None) -> None:
    """Merge tuned configs: JSON ``[[N, K, gated, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages], ...]``
    (default: the ``LLMCORE_CUDA_GEMM_CONFIGS`` environment variable)."""
    import json
    import os

    text = text if text is not None else os.environ.get("LLMCORE_CUDA_GEMM_CONFIGS")
    for row in json.loads(text) if text else []:
        n, k, gated, *cfg = row
        GEMM_CONFIGS[(int(n), int(k), bool(gated))] = tuple(int(c) for c in cfg)


load_gemm_configs()


def small_gemm_config(n: int, k: int, gated: bool, can_split: bool, num_sms: int = 132):
    key = (n, k, gated)
    if key in GEMM_CONFIGS:
        cfg = GEMM_CONFIGS[key]
        if can_split or cfg[2] == 1:
            return cfg
    # measured best on an H200 for the 1B shapes' o (2048x2048) and down (2048x8192) projections
    block_k = 256 if k >= 256 else _next_pow2(max(k, 16))
    block_n = 32
    split = 1
    if can_split:
        while -(-n // block_n) * split < 2 * num_sms and k // (split * 2) >= 2 * block_k and split < 8:
            split *= 2
    return block_n, block_k, split, 4, 3


def small_gemm(x, weight, *, residual=None, residual_out=None, norm_weight=None, eps=1e-6, bias=None,
               gated=False, x_parts=1, split_k=None, out=None, config=None):
    """``y = f(x) @ W.T`` for a few rows (decode), as one launch with its neighbours fused.

    * ``x``: ``[M, K]`` activations, or ``[x_parts, M, K]`` float32 split-K partials of the
      previous GEMM (summed here, rounded like a GEMM output);
    * ``residual``: added to ``x`` (then written to ``residual_out`` by the first column block);
    * ``norm_weight``: RMSNorm of that sum before the GEMM (transformers' rounding);
    * ``gated``: ``W`` is ``[2N, K]`` (gate; up) and the output is ``silu(gate) * up``;
    * ``split_k`` > 1 (only without a norm): returns float32 partials ``[split_k, M, N]`` for the
      consumer to sum.
    """
    w = weight
    n_tot, k = w.shape
    n = n_tot // 2 if gated else n_tot
    m = x.shape[-2]
    assert m <= 16 and w.is_contiguous() and x.is_contiguous()
    norm = norm_weight is not None
    cfg = config or small_gemm_config(n, k, gated, can_split=not norm and not gated)
    block_n, block_k, split, warps, stages = cfg
    if split_k is not None:
        split = split_k
    assert split == 1 or not (norm or gated)
    if out is None:
        if split > 1:
            out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        else:
            out = torch.empty((m, n), dtype=w.dtype, device=x.device)
    write_res = residual_out is not None
    has_res = residual is not None
    dummy = w
    _small_gemm_kernel[(triton.cdiv(n, block_n), split)](
        x, residual if has_res else dummy, residual_out if write_res else dummy,
        norm_weight if norm else dummy, w, bias if bias is not None else dummy, out,
        m, n, k, eps, m * k,
        A_PARTS=x_parts, HAS_RES=has_res, NORM=norm, WRITE_RES=write_res, GATED=gated,
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=w.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return out


@triton.jit
def _parts_rmsnorm_kernel(a_ptr, r_ptr, w_ptr, out_ptr, N, eps, a_part_stride,
                          A_PARTS: tl.constexpr, WRITE_RES: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    DT = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _pdl_wait(PDL, True)
    x = tl.load(a_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    for p in tl.static_range(1, A_PARTS):
        x += tl.load(a_ptr + p * a_part_stride + row * N + offs, mask=mask, other=0.0)
    x = x.to(DT).to(tl.float32)
    x = (x + tl.load(r_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)).to(DT)
    if WRITE_RES:
        tl.store(r_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(DT).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (w * y).to(DT), mask=mask)


def parts_rmsnorm(parts, residual, weight, eps, write_residual=False, pdl=False):
    """``residual += sum(parts)`` (rounded like a GEMM output; in place if ``write_residual``),
    then ``rmsnorm(residual) * weight``. ``parts``: float32 split-K partials ``[P, M, N]`` or a
    plain ``[M, N]`` GEMM output."""
    if parts.dim() == 2:
        parts = parts.unsqueeze(0)
    p, m, n = parts.shape
    assert parts.is_contiguous() and residual.is_contiguous()
    out = torch.empty((m, n), dtype=residual.dtype, device=residual.device)
    block = _next_pow2(n)
    _parts_rmsnorm_kernel[(m,)](parts, residual, weight, out, n, eps, m * n, A_PARTS=p,
                                WRITE_RES=write_residual, BLOCK=block, PDL=pdl,
                                num_warps=min(16, max(1, block // 256)), **_pdl_kw(pdl))
    return out


# ------------------------------------------------------ GEMV for one decode row


@triton.jit
def _gemv_store(acc, acc2, n, nm, pid_k, bias_ptr, out_ptr, N, DT: tl.constexpr,
                GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    if HAS_BIAS:
        first = (pid_k == 0).to(tl.float32)
        acc += first * tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)
        if GATED:
            acc2 += first * tl.load(bias_ptr + N + n, mask=nm, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        if GATED:
            gt = acc.to(DT).to(tl.float32)
            up = acc2.to(DT).to(tl.float32)
            act = (gt / (1.0 + tl.exp(-gt))).to(DT).to(tl.float32)
            y = (act * up).to(DT)
        else:
            y = acc.to(DT)
        tl.store(out_ptr + n, y, mask=nm)
    else:
        tl.store(out_ptr + pid_k * N + n, acc, mask=nm)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, r_ptr, r_out_ptr, nw_ptr, eps,
    N, K, KC, NB, x_part_stride,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
    PERSIST: tl.constexpr, NORM: tl.constexpr, X_PARTS: tl.constexpr,
):
    """``y = W x`` for one activation row: program (i, j) reduces rows ``i*BLOCK_N ..`` of ``W``
    over the ``j``-th slice of ``KC`` columns, ``BLOCK_K`` at a time, as float32 products summed
    per row (CUDA cores: one row has nothing for the tensor cores to share).

    The first ``[BLOCK_N, BLOCK_K]`` weight tile (all of it when ``BLOCK_K >= KC``) is loaded
    before the grid-dependency wait: with PDL the weights stream in while the kernel before
    this one (which produces ``x``) still runs.

    ``PERSIST``: a fixed grid of programs, program ``i`` taking row blocks ``i, i + P, ..`` of
    the ``NB``, each with its whole K slice in one tile (``BLOCK_K >= KC``); the next block's
    tile is loaded before this one is reduced (two tiles in flight per program).

    ``NORM`` (one K slice, ``BLOCK_K >= K``): ``x`` is the previous GEMM's output (``X_PARTS``
    float32 split-K partials ``x_part_stride`` apart, or one plain row); every program computes
    ``r_out = sum(x) + r`` and ``rmsnorm(r_out) * nw`` itself (transformers' roundings, as
    :func:`parts_rmsnorm`), and program 0 writes ``r_out`` (a buffer other than ``r``).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    DT = w_ptr.dtype.element_ty
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    k_lo = pid_k * KC
    k_hi = tl.minimum(k_lo + KC, K)
    kk = tl.arange(0, BLOCK_K)
    k = k_lo + kk
    km = k < k_hi
    wm = nm[:, None] & km[None, :]
    w = tl.load(w_ptr + n.to(tl.int64)[:, None] * K + k[None, :], mask=wm, other=0.0,
                eviction_policy="evict_first")
    w2 = w
    if GATED:
        w2 = tl.load(w_ptr + (n + N).to(tl.int64)[:, None] * K + k[None, :], mask=wm, other=0.0,
                     eviction_policy="evict_first")
    if NORM:
        nw = tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32)
    _pdl_wait(PDL, EARLY)
    if NORM:
        xs = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)
        for p in tl.static_range(1, X_PARTS):
            xs += tl.load(x_ptr + p * x_part_stride + k, mask=km, other=0.0)
        xs = xs.to(DT).to(tl.float32)
        xr = (xs + tl.load(r_ptr + k, mask=km, other=0.0).to(tl.float32)).to(DT)
        tl.store(r_out_ptr + k, xr, mask=km & (pid_n == 0))
        xf = xr.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / K
        y = (xf * tl.rsqrt(var + eps)).to(DT).to(tl.float32)
        x = (nw * y).to(DT).to(tl.float32)[None, :]
    else:
        x = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)[None, :]
    if PERSIST:
        step = tl.num_programs(0)
        for i in range(pid_n, NB, step):
            # the next row block's tile first (all masked past the last block: no traffic)
            n2 = (i + step) * BLOCK_N + tl.arange(0, BLOCK_N)
            nm2 = n2 < N
            wm2 = nm2[:, None] & km[None, :]
            w_nx = tl.load(w_ptr + n2.to(tl.int64)[:, None] * K + k[None, :], mask=wm2, other=0.0,
                           eviction_policy="evict_first")
            w2_nx = w_nx
            if GATED:
                w2_nx = tl.load(w_ptr + (n2 + N).to(tl.int64)[:, None] * K + k[None, :], mask=wm2, other=0.0,
                                eviction_policy="evict_first")
            acc = tl.sum(w.to(tl.float32) * x, axis=1)
            acc2 = acc
            if GATED:
                acc2 = tl.sum(w2.to(tl.float32) * x, axis=1)
            _gemv_store(acc, acc2, n, nm, pid_k, bias_ptr, out_ptr, N, DT, GATED, HAS_BIAS, SPLIT_K)
            w = w_nx
            w2 = w2_nx
            n = n2
            nm = nm2
    else:
        acc = tl.sum(w.to(tl.float32) * x, axis=1)
        acc2 = acc
        if GATED:
            acc2 = tl.sum(w2.to(tl.float32) * x, axis=1)
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            k = k0 + kk
            km = k < k_hi
            wm = nm[:, None] & km[None, :]
            w = tl.load(w_ptr + n.to(tl.int64)[:, None] * K + k[None, :], mask=wm, other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)[None, :]
            acc += tl.sum(w.to(tl.float32) * x, axis=1)
            if GATED:
                w2 = tl.load(w_ptr + (n + N).to(tl.int64)[:, None] * K + k[None, :], mask=wm, other=0.0,
                             eviction_policy="evict_first")
                acc2 += tl.sum(w2.to(tl.float32) * x, axis=1)
        _gemv_store(acc, acc2, n, nm, pid_k, bias_ptr, out_ptr, N, DT, GATED, HAS_BIAS, SPLIT_K)


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, programs per SM or 0) per weight shape (N, K, gated) for
# one decode row; programs per SM > 0 selects the persistent kernel. Else gemv_config's heuristic.
GEMV_CONFIGS: dict[tuple[int, int, bool], tuple[int, int, int, int, int]] = {
    # Llama-1B shapes, tuned on an H200 by benchmarks/cuda_bench.py (roofline phase, tune_gemv:
    # chained in a CUDA graph with PDL, qkv and gate_up with the norm fused; cuBLAS in brackets):
    # qkv 4.35 us (6.41), o 3.21 (6.03), gate_up 17.12 (20.07 with the SiLU kernel), down 8.60 (13.48)
    (3072, 2048, False): (4, 2048, 1, 4, 3),
    (2048, 2048, False): (8, 2048, 1, 8, 0),
    (8192, 2048, True): (2, 2048, 1, 4, 4),
    (2048, 8192, False): (2, 8192, 1, 8, 2),
}

# Whether GEMV programs signal their dependents before their own wait (deeper overlap) rather
# than after it. Measured on an H200 (batch-1 decode graph of the 1B shape): with the tuned
# persistent tiles and fused norms, after the wait is faster (0.738 vs 0.742 ms); with one
# program per row block and separate norm launches, before it was (0.791 vs 0.794 ms).
GEMV_EARLY_TRIGGER = False


def load_gemv_configs(text: str | None = None) -> None:
    """Merge tuned GEMV configs: JSON ``[[N, K, gated, BLOCK_N, BLOCK_K, SPLIT_K, warps(, per_sm)], ...]``
    (default: the ``LLMCORE_CUDA_GEMV_CONFIGS`` environment variable)."""
    import json
    import os

    text = text if text is not None else os.environ.get("LLMCORE_CUDA_GEMV_CONFIGS")
    for row in json.loads(text) if text else []:
        n, k, gated, *cfg = row
        cfg = [int(c) for c in cfg] + [0] * (5 - len(cfg))
        GEMV_CONFIGS[(int(n), int(k), bool(gated))] = tuple(cfg[:5])


load_gemv_configs()

_SMS: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 8
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def gemv_can_fuse_norm(k: int) -> bool:
    """Whether :func:`gemv` can take the RMSNorm of its input (one tile row holds all of K)."""
    return _next_pow2(k) <= 8192


def gemv_config(n: int, k: int, gated: bool, itemsize: int, can_split: bool, num_sms: int = 132,
                norm: bool = False):
    cfg = GEMV_CONFIGS.get((n, k, gated))
    if cfg is not None:
        cfg = tuple(cfg) + (0,) * (5 - len(cfg))
        if (can_split or cfg[2] == 1) and (not norm or (cfg[2] == 1 and cfg[1] >= k)):
            return cfg
    # ~32 KB of weights per program, all loaded before the wait; split K only where N alone
    # gives too few programs to keep every SM streaming
    elems = (32768 // itemsize) // (2 if gated else 1)
    block_k = _next_pow2(k) if norm else min(_next_pow2(k), 4096, elems)
    block_n = max(1, min(64, elems // block_k))
    split = 1
    if can_split and not norm:
        while -(-n // block_n) * split < 2 * num_sms and k // (split * 2) >= block_k and split < 8:
            split *= 2
    return block_n, block_k, split, 4, 0


def gemv(x, weight, *, bias=None, gated=False, can_split=False, config=None, pdl=False, out=None,
         norm=None):
    """``y = x @ W.T`` for one row ``x`` ``[1, K]`` (decode at batch 1).

    Returns ``[1, N]`` in the weight dtype, or with ``SPLIT_K`` > 1 (only if ``can_split``, the
    consumer sums partials, e.g. :func:`parts_rmsnorm`) float32 partials ``[SPLIT_K, 1, N]``.
    ``gated``: ``W`` is ``[2N, K]`` (gate; up) and the output ``silu(gate) * up``.

    ``norm=(residual, residual_out, norm_weight, eps)``: ``x`` is the previous GEMM's output,
    ``[1, K]`` or float32 partials ``[P, 1, K]``; the GEMV multiplies
    ``rmsnorm(sum(x) + residual) * norm_weight`` and writes ``sum(x) + residual`` to
    ``residual_out`` (see :func:`parts_rmsnorm`; needs :func:`gemv_can_fuse_norm`).
    """
    w = weight
    n_tot, k = w.shape
    n = n_tot // 2 if gated else n_tot
    x_parts = x.shape[0] if x.dim() == 3 else 1
    assert x.shape[-2] == 1 and x.shape[-1] == k and x.is_contiguous() and w.is_contiguous()
    assert x_parts == 1 or norm is not None
    sms = _num_sms(x.device)
    cfg = tuple(config) + (0,) * (5 - len(config)) if config else None
    cfg = cfg or gemv_config(n, k, gated, w.element_size(), can_split and not gated, sms, norm is not None)
    block_n, block_k, split, warps, per_sm = cfg
    assert split == 1 or not gated
    kc = -(-k // split)
    kc = -(-kc // block_k) * block_k if split > 1 else k
    split = -(-k // kc)
    if norm is not None:
        assert split == 1 and block_k >= k, "a fused norm needs the whole row in one tile"
        res, res_out, nw, eps = norm
        assert res.is_contiguous() and res_out.is_contiguous() and res_out.data_ptr() != res.data_ptr()
    else:
        res = res_out = nw = w
        eps = 0.0
    persist = per_sm > 0 and block_k >= kc
    nb = triton.cdiv(n, block_n)
    grid0 = min(nb, per_sm * sms) if persist else nb
    if out is None:
        if split > 1:
            out = torch.empty((split, 1, n), dtype=torch.float32, device=x.device)
        else:
            out = torch.empty((1, n), dtype=w.dtype, device=x.device)
    _gemv_kernel[(grid0, split)](
        x, w, bias if bias is not None else w, out, res, res_out, nw, eps, n, k, kc, nb, k,
        GATED=gated, HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=block_k,
        PDL=pdl, EARLY=GEMV_EARLY_TRIGGER, PERSIST=persist, NORM=norm is not None, X_PARTS=x_parts,
        num_warps=warps, num_stages=1, **_pdl_kw(pdl),
    )
    return out


# ------------------------------------------------------------------- argmax


@triton.jit
def _argmax_stage1(x_ptr, vals_ptr, idx_ptr, V, stride, NB, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, axis=0)
    idx = tl.min(tl.where(x == mx, offs, 2147483647), axis=0)
    tl.store(vals_ptr + row * NB + blk, mx)
    tl.store(idx_ptr + row * NB + blk, idx)


@triton.jit
def _argmax_stage2(vals_ptr, idx_ptr, out_ptr, NB, BLOCK_B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK_B)
    m = b < NB
    v = tl.load(vals_ptr + row * NB + b, mask=m, other=float("-inf"))
    i = tl.load(idx_ptr + row * NB + b, mask=m, other=2147483647)
    mx = tl.max(v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(v == mx, i, 2147483647), axis=0).to(tl.int64))


def argmax(logits, block: int = 4096):
    """Row-wise argmax (first index of the maximum, like torch) of ``[B, V]`` logits -> int64 [B].

    Two small launches that use the whole GPU even for one row (torch's reduction runs one
    row on a few SMs: ~36 us for a 128k vocabulary on an H200)."""
    b, v = logits.shape
    assert logits.stride(1) == 1
    nb = triton.cdiv(v, block)
    vals = torch.empty((b, nb), dtype=torch.float32, device=logits.device)
    idx = torch.empty((b, nb), dtype=torch.int32, device=logits.device)
    out = torch.empty((b,), dtype=torch.int64, device=logits.device)
    _argmax_stage1[(b, nb)](logits, vals, idx, v, logits.stride(0), nb, BLOCK=block, num_warps=8)
    _argmax_stage2[(b,)](vals, idx, out, nb, BLOCK_B=max(16, _next_pow2(nb)), num_warps=1)
    return out


# --------------------------------------------------------- prefill attention


@triton.jit
def _prefill_attn_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qstart_ptr, ctx_ptr, tile_seq_ptr, tile_m_ptr, out_ptr,
    scale, bt_stride,
    H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    s = tl.load(tile_seq_ptr + tile).to(tl.int64)
    m0 = tl.load(tile_m_ptr + tile)
    q0 = tl.load(qstart_ptr + s)
    ql = tl.load(qstart_ptr + s + 1) - q0
    ctx = tl.load(ctx_ptr + s)
    rows = m0 + tl.arange(0, BLOCK_M)
    rm = rows < ql
    qpos = ctx - ql + rows
    dd = tl.arange(0, BLOCK_D)
    dm = dd < D
    qoff = (q0 + rows).to(tl.int64) * (H * D) + h * D
    q = tl.load(q_ptr + qoff[:, None] + dd[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(ctx, ctx - ql + m0 + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        tm = t < hi
        blk = tl.load(bt_ptr + s * bt_stride + t // BS, mask=tm, other=0).to(tl.int64)
        off = (blk * BS + t % BS) * (KVH * D) + kvh * D
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(k_ptr + off[:, None] + dd[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + off[:, None] + dd[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        ok = (t[None, :] <= qpos[:, None]) & tm[None, :]
        sc = tl.where(ok, sc * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + qoff[:, None] + dd[None, :], o.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & dm[None, :])


PREFILL_BLOCK_M = 64


def prefill_tiles(query_lens, block_m: int = PREFILL_BLOCK_M, min_len: int = 1):
    """Host-side map program -> (sequence, first query row) for :func:`prefill_attention`.

    Sequences with fewer than ``min_len`` queries get no tiles (mixed batches send their
    single-token decodes through :func:`decode_attention` instead).
    """
    seq, m = [], []
    for i, ql in enumerate(query_lens):
        if ql < min_len:
            continue
        for start in range(0, ql, block_m):
            seq.append(i)
            m.append(start)
    return seq, m


def prefill_attention(q, k_cache, v_cache, block_tables, query_starts, context_lens, tile_seq, tile_m,
                      scale, out=None, block_m: int = PREFILL_BLOCK_M):
    """Variable-length causal attention over the paged cache (new K/V already written).

    ``q`` [T, H, D] contiguous; ``query_starts`` [S+1], ``context_lens`` [S],
    ``block_tables`` [S, W], ``tile_seq``/``tile_m`` from :func:`prefill_tiles` (int32 tensors).
    """
    t, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    assert q.is_contiguous() and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    n_tiles = tile_seq.shape[0]
    if n_tiles == 0:
        return out
    ieee = q.dtype == torch.float32
    bd = _next_pow2(d)
    block_n = 64 if bd <= 64 else 32
    if ieee:
        block_n = 32
    _prefill_attn_kernel[(n_tiles, h)](
        q, k_cache, v_cache, block_tables, query_starts, context_lens, tile_seq, tile_m, out,
        scale, block_tables.stride(0),
        H=h, KVH=kvh, G=h // kvh, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, IEEE=ieee,
        num_warps=4, num_stages=2,
    )
    return out
