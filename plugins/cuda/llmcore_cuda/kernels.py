"""Triton kernels for the CUDA runner.

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
* :func:`prefill_attention` -- variable-length queries (chunked prefill, prefix
  cache hits, mixed prefill+decode batches): query ``j`` of a sequence sits at
  position ``ctx - qlen + j`` and attends to cached keys ``0 .. ctx - qlen + j``,
  all read through the block table (new K/V are written to the cache first).

Elementwise kernels reproduce transformers' rounding (each bf16/fp16 product
rounded before the next op) so greedy output tracks HF closely; accumulations
are in float32. With float32 inputs, dots use IEEE float32 (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DOT_F32 = "ieee"


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# --------------------------------------------------------------------- norms


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * N + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (w * y).to(x.dtype), mask=mask)


def add_rmsnorm(x, residual, weight, eps, out=None):
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
        HAS_RES=has_res, BLOCK=block, num_warps=min(16, max(1, block // 256)),
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
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
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
