"""Triton kernels against float64 references on random inputs and odd shapes."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.conftest import skip_large_when_interpreted

pytestmark = pytest.mark.gpu


def rel_err(out, ref):
    out = out.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def make_paged(ctx_lens, kvh, d, bs, dtype, dev, gen, extra_blocks=3):
    """Random cache with each sequence's blocks scattered in a shuffled pool."""
    need = sum(-(-c // bs) for c in ctx_lens)
    nb = need + extra_blocks
    perm = torch.randperm(nb, generator=gen).tolist()
    tables, i = [], 0
    for c in ctx_lens:
        n = -(-c // bs)
        tables.append(perm[i : i + n])
        i += n
    k = torch.randn(nb, bs, kvh, d, generator=gen, dtype=torch.float64).to(dtype).to(dev)
    v = torch.randn(nb, bs, kvh, d, generator=gen, dtype=torch.float64).to(dtype).to(dev)
    width = max(len(t) for t in tables) + 2
    bt = torch.full((len(tables), width), nb - 1, dtype=torch.int32)
    for r, t in enumerate(tables):
        bt[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return k, v, tables, bt.to(dev)


def ref_attention(q, k_cache, v_cache, table, ctx, qlen, scale):
    """float64: q [ql, H, D]; queries at positions ctx-ql .. ctx-1, causal."""
    bs = k_cache.shape[1]
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    h = q.shape[1]
    idx = torch.tensor(table, device=k_cache.device)
    kk = k_cache.index_select(0, idx).reshape(-1, kvh, d)[:ctx].double().cpu()
    vv = v_cache.index_select(0, idx).reshape(-1, kvh, d)[:ctx].double().cpu()
    rep = h // kvh
    kk = kk.repeat_interleave(rep, dim=1)  # [ctx, H, D]
    vv = vv.repeat_interleave(rep, dim=1)
    qq = q.double().cpu()
    s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
    qpos = torch.arange(ctx - qlen, ctx)[:, None]
    kpos = torch.arange(ctx)[None, :]
    s = s.masked_fill(~(kpos <= qpos)[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, vv)


CASES = [
    # (heads, kv_heads, head_dim, block_size, dtype)
    (8, 8, 64, 16, torch.bfloat16),
    (16, 4, 128, 16, torch.bfloat16),
    (32, 4, 64, 32, torch.float16),
    (8, 1, 128, 32, torch.float32),
    (12, 4, 64, 16, torch.float32),  # G=3: padded query-group rows
]


@pytest.mark.parametrize("h,kvh,d,bs,dtype", CASES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention(kdev, h, kvh, d, bs, dtype, num_splits):
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(h * 131 + d + bs + num_splits)
    ctx_lens = [1, bs - 1, bs + 1, 3 * bs, 77, 200]
    k, v, tables, bt = make_paged(ctx_lens, kvh, d, bs, dtype, kdev, gen)
    b = len(ctx_lens)
    q = torch.randn(b, h, d, generator=gen, dtype=torch.float64).to(dtype).to(kdev)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=kdev)
    scale = d**-0.5
    out = torch.full((b, h, d), float("nan"), dtype=dtype, device=kdev)
    kernels.decode_attention(q, k, v, bt, ctx, scale, num_splits=num_splits, out=out)
    for i, c in enumerate(ctx_lens):
        ref = ref_attention(q[i : i + 1], k, v, tables[i], c, 1, scale)[0]
        err = rel_err(out[i].cpu(), ref)
        assert err < TOL[dtype], f"seq {i} ctx {c}: rel err {err}"


def test_decode_attention_padding_rows(kdev):
    """Rows with context 0 (CUDA-graph padding) produce zeros, not NaN, and don't disturb others."""
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(5)
    k, v, tables, bt = make_paged([40, 1], 2, 64, 16, torch.float16, kdev, gen)
    q = torch.randn(3, 8, 64, generator=gen).to(torch.float16).to(kdev)
    bt3 = torch.cat([bt, bt[:1]], 0)
    ctx = torch.tensor([40, 0, 0], dtype=torch.int32, device=kdev)
    for splits in (1, 8):
        out = kernels.decode_attention(q, k, v, bt3, ctx, 0.125, num_splits=splits)
        assert torch.all(out[1:] == 0)
        ref = ref_attention(q[:1], k, v, tables[0], 40, 1, 0.125)[0]
        assert rel_err(out[0].cpu(), ref) < TOL[torch.float16]


@pytest.mark.parametrize("h,kvh,d,bs,dtype", CASES)
@pytest.mark.parametrize("decode_kernel", [False, True])
def test_prefill_attention_varlen_with_prefix(kdev, h, kvh, d, bs, dtype, decode_kernel):
    """Mixed batch: full prompts, chunks after a cached prefix, single-token decodes
    (through the prefill kernel, or through the mapped decode kernel)."""
    from llmcore_cuda import kernels

    skip_large_when_interpreted(kdev, h == 32 and not decode_kernel)

    gen = torch.Generator().manual_seed(h + kvh * 7 + d + bs)
    # (context after this step, new query tokens)
    seqs = [(70, 70), (100, 37), (2 * bs, 1), (bs + 3, bs + 3), (130, 65), (5, 1)]
    ctx_lens = [c for c, _ in seqs]
    qlens = [ql for _, ql in seqs]
    k, v, tables, bt = make_paged(ctx_lens, kvh, d, bs, dtype, kdev, gen)
    total = sum(qlens)
    q = torch.randn(total, h, d, generator=gen, dtype=torch.float64).to(dtype).to(kdev)
    starts = [0]
    for ql in qlens:
        starts.append(starts[-1] + ql)
    ts, tm = kernels.prefill_tiles(qlens, min_len=2 if decode_kernel else 1)
    i32 = dict(dtype=torch.int32, device=kdev)
    out = torch.full_like(q, float("nan"))
    scale = d**-0.5
    qs, cl = torch.tensor(starts, **i32), torch.tensor(ctx_lens, **i32)
    kernels.prefill_attention(q, k, v, bt, qs, cl, torch.tensor(ts, **i32), torch.tensor(tm, **i32), scale, out=out)
    if decode_kernel:
        dec = torch.tensor([i for i, ql in enumerate(qlens) if ql == 1], **i32)
        kernels.decode_attention(q, k, v, bt, cl, scale, num_splits=2, out=out, seq_map=dec, query_starts=qs)
    for i, (c, ql) in enumerate(seqs):
        ref = ref_attention(q[starts[i] : starts[i + 1]], k, v, tables[i], c, ql, scale)
        err = rel_err(out[starts[i] : starts[i + 1]].cpu(), ref)
        assert err < TOL[dtype], f"seq {i} (ctx {c}, q {ql}): rel err {err}"


def hf_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("h,kvh,d,dtype,qk_norm", [
    (8, 2, 64, torch.bfloat16, False),
    (12, 4, 128, torch.float32, False),
    (4, 4, 64, torch.bfloat16, True),
    (6, 2, 80, torch.float16, False),  # head_dim not a power of two
])
def test_rope_and_cache_matches_hf_rounding(kdev, h, kvh, d, dtype, qk_norm):
    from llmcore.models.llama import RMSNorm
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(d + h)
    t, nb, bs = 7, 6, 16
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen).to(dtype).to(kdev)
    pos = torch.tensor([0, 3, 17, 18, 40, 63, 5], device=kdev)
    slots = torch.tensor([0, 5, 33, 34, 80, 95, 17], device=kdev)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    fr = torch.arange(64).float()[:, None] * inv[None]
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos().to(dtype).to(kdev), emb.sin().to(dtype).to(kdev)
    kc = torch.zeros(nb, bs, kvh, d, dtype=dtype, device=kdev)
    vc = torch.zeros_like(kc)
    qn = kn = None
    if qk_norm:
        qn = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype).to(kdev)
        kn = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype).to(kdev)
    qo = kernels.rope_and_cache(qkv, pos, slots, cos, sin, kc, vc, h, kvh, d, q_norm=qn, k_norm=kn, eps=1e-6)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], -1)
    q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
    if qk_norm:
        nq, nk = RMSNorm(d, 1e-6).to(kdev), RMSNorm(d, 1e-6).to(kdev)
        nq.weight.data, nk.weight.data = qn, kn
        q, k = nq(q), nk(k)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    # same rounding steps as transformers; at most one unit in the last place apart (the
    # compiler may fuse a multiply-add in float32 where torch rounds twice)
    # (Triton's compiler contracts multiply-adds and drops the float32 -> bf16 -> float32
    # round trip of a product, where torch rounds every op: on an H200 ~13% of elements
    # differ, each by at most one rounding of the products' magnitude)
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for got, x in ((qo, q), (kc.view(-1, kvh, d)[slots], k)):
        want = hf_rope(x, c, s)
        xa = x.double().abs()
        x1, x2 = xa.chunk(2, dim=-1)
        mag = xa * c.double().abs() + torch.cat((x2, x1), dim=-1) * s.double().abs()
        diff = (got.double() - want.double()).abs()
        assert torch.all(diff <= 2 * ulp * mag + 1e-30), diff.max().item()
    assert torch.equal(vc.view(-1, kvh, d)[slots], v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [64, 576, 2048])
def test_add_rmsnorm_matches_model_rmsnorm(kdev, dtype, n):
    from llmcore.models.llama import RMSNorm
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=gen).to(dtype).to(kdev)
    r = torch.randn(5, n, generator=gen).to(dtype).to(kdev)
    norm = RMSNorm(n, 1e-5).to(kdev).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype).to(kdev)
    want_res = x + r
    want = norm(want_res)
    out, res = kernels.add_rmsnorm(x, r.clone(), norm.weight, 1e-5)
    assert torch.equal(res, want_res)
    tol = 0 if dtype == torch.float32 else 1e-2
    assert (out.double() - want.double()).abs().max().item() <= tol * want.abs().max().item() + 1e-6
    # first layer: no residual
    out0, res0 = kernels.add_rmsnorm(x, None, norm.weight, 1e-5)
    assert res0 is x
    assert rel_err(out0.cpu(), norm(x).double().cpu()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul(kdev, dtype):
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2 * 1500, generator=gen).to(dtype).to(kdev)
    g, u = x.split(1500, -1)
    want = torch.nn.functional.silu(g) * u
    got = kernels.silu_mul(x)
    assert rel_err(got.cpu(), want.double().cpu()) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_choose_num_splits():
    pytest.importorskip("triton")
    from llmcore_cuda.kernels import choose_num_splits

    assert choose_num_splits(1, 8, 4096, 16, 132) == 32
    assert choose_num_splits(1, 8, 20, 16, 132) == 1
    assert choose_num_splits(256, 8, 4096, 16, 132) == 1
    assert choose_num_splits(8, 8, 4096, 16, 132) == 8


# ------------------------------------------------ fused small-batch decode path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
def test_small_gemm_plain_and_split(kdev, dtype, m):
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 512, generator=gen).to(dtype).to(kdev)
    w = (0.05 * torch.randn(96, 512, generator=gen)).to(dtype).to(kdev)
    bias = torch.randn(96, generator=gen).to(dtype).to(kdev)
    ref = x.double() @ w.double().T + bias.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    y = kernels.small_gemm(x, w, bias=bias, config=(32, 128, 1, 4, 2))
    assert y.dtype == dtype and rel_err(y.cpu(), ref.cpu()) < tol
    parts = kernels.small_gemm(x, w, bias=bias, config=(16, 64, 4, 4, 2))
    assert parts.shape == (4, m, 96) and parts.dtype == torch.float32
    assert rel_err(parts.sum(0).cpu(), ref.cpu()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gated", [False, True])
def test_small_gemm_fused_residual_norm(kdev, dtype, gated):
    """Consumer of split-K partials: sum + residual add + RMSNorm + GEMM (+ SiLU gate)."""
    from llmcore.models.llama import RMSNorm
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(7 + gated)
    m, k, n = 2, 384, 80
    parts = torch.randn(3, m, k, generator=gen).to(kdev)
    r = torch.randn(m, k, generator=gen).to(dtype).to(kdev)
    norm = RMSNorm(k, 1e-5).to(kdev).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype).to(kdev)
    w = (0.05 * torch.randn(2 * n if gated else n, k, generator=gen)).to(dtype).to(kdev)
    r_out = torch.full_like(r, float("nan"))
    y = kernels.small_gemm(parts, w, residual=r, residual_out=r_out, norm_weight=norm.weight, eps=1e-5,
                           gated=gated, x_parts=3, config=(16, 128, 1, 4, 2))
    s = parts.sum(0).to(dtype) + r
    assert torch.equal(r_out, s)
    h = norm(s).double()
    ref = h @ w.double().T
    if gated:
        g, u = ref.split(n, -1)
        ref = torch.nn.functional.silu(g) * u
    assert rel_err(y.cpu(), ref.cpu()) < (1e-5 if dtype == torch.float32 else 2e-2)
    out = kernels.parts_rmsnorm(parts, r, norm.weight, 1e-5)
    assert rel_err(out.cpu(), norm(s).double().cpu()) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("h,kvh,d,bs,dtype,qk_norm", [
    (8, 2, 64, 16, torch.bfloat16, False),
    (16, 4, 128, 32, torch.float16, False),
    (8, 8, 64, 16, torch.float32, True),
    (12, 4, 64, 16, torch.float32, False),
])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_rope_matches_two_kernels(kdev, h, kvh, d, bs, dtype, qk_norm, num_splits):
    from llmcore_cuda import kernels

    skip_large_when_interpreted(kdev, num_splits > 1 and h != 12)  # G=3 keeps its split-K case

    gen = torch.Generator().manual_seed(h + d + num_splits)
    ctx_lens = [1, bs, bs + 1, 70, 0]  # the last row is CUDA-graph padding
    k1, v1, tables, bt = make_paged([max(c, 1) for c in ctx_lens], kvh, d, bs, dtype, kdev, gen)
    k2, v2 = k1.clone(), v1.clone()
    b = len(ctx_lens)
    qkv = torch.randn(b, (h + 2 * kvh) * d, generator=gen).to(dtype).to(kdev)
    pos = torch.tensor([max(c - 1, 0) for c in ctx_lens], device=kdev)
    slots = torch.tensor([tables[i][p // bs] * bs + p % bs for i, p in enumerate(pos.tolist())], device=kdev)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    fr = torch.arange(128).float()[:, None] * inv[None]
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos().to(dtype).to(kdev), emb.sin().to(dtype).to(kdev)
    qn = kn = None
    if qk_norm:
        qn = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype).to(kdev)
        kn = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype).to(kdev)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=kdev)
    scale = d**-0.5
    q = kernels.rope_and_cache(qkv, pos, slots, cos, sin, k1, v1, h, kvh, d, q_norm=qn, k_norm=kn)
    want = kernels.decode_attention(q, k1, v1, bt, ctx, scale, num_splits=num_splits)
    got = kernels.decode_attention_rope(qkv, pos, slots, cos, sin, k2, v2, bt, ctx, h, scale,
                                        num_splits=num_splits, q_norm=qn, k_norm=kn)
    live = slice(0, b - 1)
    ka, kb = k1.view(-1, kvh, d)[slots[live]].double(), k2.view(-1, kvh, d)[slots[live]].double()
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    torch.testing.assert_close(kb, ka, rtol=8 * ulp, atol=8 * ulp)  # same math, other rounding order
    assert torch.equal(v1.view(-1, kvh, d)[slots[live]], v2.view(-1, kvh, d)[slots[live]])
    assert torch.all(got[b - 1] == 0)
    for i in range(b - 1):
        ref = ref_attention(q[i : i + 1], k1, v1, tables[i], ctx_lens[i], 1, scale)[0]
        assert rel_err(got[i].cpu(), ref) < TOL[dtype], f"row {i}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_parts_rmsnorm_updates_residual(kdev, dtype):
    from llmcore.models.llama import RMSNorm
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(11)
    parts = torch.randn(4, 3, 640, generator=gen).to(kdev)
    r = torch.randn(3, 640, generator=gen).to(dtype).to(kdev)
    norm = RMSNorm(640, 1e-6).to(kdev).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(640, generator=gen)).to(dtype).to(kdev)
    want_res = parts.sum(0).to(dtype) + r
    out = kernels.parts_rmsnorm(parts, r, norm.weight, 1e-6, write_residual=True)
    assert torch.equal(r, want_res)
    assert rel_err(out.cpu(), norm(want_res).double().cpu()) < (1e-6 if dtype == torch.float32 else 1e-2)
    plain = parts[0].to(dtype)
    r2 = torch.zeros_like(r)
    kernels.parts_rmsnorm(plain, r2, norm.weight, 1e-6, write_residual=True)
    assert torch.equal(r2, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_first_maximum(kdev, dtype):
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 10000, generator=gen).to(dtype)
    x[1, 7] = x[1, 9000] = 50.0  # tie: the first index wins, as in torch
    x[2, 9999] = 60.0
    x[3, 0] = 70.0
    x = x.to(kdev)
    assert kernels.argmax(x, block=1024).tolist() == x.float().argmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_small_gemm_gated_silu(kdev, dtype):
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 256, generator=gen).to(dtype).to(kdev)
    w = (0.05 * torch.randn(2 * 48, 256, generator=gen)).to(dtype).to(kdev)
    bias = torch.randn(96, generator=gen).to(dtype).to(kdev)
    y = kernels.small_gemm(x, w, bias=bias, gated=True, config=(16, 64, 1, 4, 2))
    ref = x.double() @ w.double().T + bias.double()
    g, u = ref.split(48, -1)
    assert rel_err(y.cpu(), (torch.nn.functional.silu(g) * u).cpu()) < (1e-5 if dtype == torch.float32 else 2e-2)


# ------------------------------------------------------------ batch-1 GEMV


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,gated,config,can_split", [
    (96, 512, False, (8, 128, 1, 4), False),  # K loop, one slice
    (96, 512, False, (16, 64, 4, 4), True),  # split-K float32 partials
    (70, 1000, False, (4, 256, 3, 4), True),  # ragged N and K, ragged last slice
    (50, 300, True, (4, 128, 1, 4), False),  # gated SiLU*up, ragged
    (64, 256, True, (2, 256, 1, 8), False),  # the whole K in one tile
    (33, 200, False, None, True),  # heuristic config
    (40, 2048, True, None, False),
    (96, 512, False, (4, 512, 1, 4, 1), False),  # persistent: several row blocks per program
    (2000, 256, True, (2, 256, 1, 4, 1), False),  # persistent on a GPU too (1000 blocks)
    (1100, 384, False, (4, 256, 2, 4, 2), True),  # persistent, split-K
    # the same two at sizes Triton's interpreter runs quickly (it counts 8 SMs: 20 and 25 blocks)
    (40, 256, True, (2, 256, 1, 4, 1), False),
    (100, 384, False, (4, 256, 2, 4, 2), True),
])
def test_gemv(kdev, dtype, n, k, gated, config, can_split):
    from llmcore_cuda import kernels

    skip_large_when_interpreted(kdev, n >= 1000)

    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(dtype).to(kdev)
    rows = 2 * n if gated else n
    w = (0.05 * torch.randn(rows, k, generator=gen)).to(dtype).to(kdev)
    for bias in (None, torch.randn(rows, generator=gen).to(dtype).to(kdev)):
        ref = x.double() @ w.double().T
        if bias is not None:
            ref = ref + bias.double()
        if gated:
            g, u = ref.split(n, -1)
            ref = torch.nn.functional.silu(g) * u
        y = kernels.gemv(x, w, bias=bias, gated=gated, can_split=can_split, config=config)
        if y.dim() == 3:
            assert can_split and y.dtype == torch.float32 and y.shape[1:] == (1, n)
            tol = 1e-5
            y = y.sum(0)
        else:
            assert y.dtype == dtype and y.shape == (1, n)
            tol = 1e-6 if dtype == torch.float32 else 2e-2
        assert rel_err(y.cpu(), ref.cpu()) < tol
    if config is not None and config[2] > 1:
        assert kernels.gemv(x, w, can_split=True, config=config).shape[0] > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("parts,gated,config", [
    (3, False, (8, 512, 1, 4)), (1, True, (4, 512, 1, 4)), (2, True, (2, 512, 1, 4, 1)), (1, False, None),
])
def test_gemv_fused_residual_norm(kdev, dtype, parts, gated, config):
    """The GEMV taking the previous GEMM's output: partial sum + residual add + RMSNorm in every
    program (program 0 writes the new residual), then the product."""
    from llmcore.models.llama import RMSNorm
    from llmcore_cuda import kernels

    gen = torch.Generator().manual_seed(parts * 10 + gated)
    k, n = 448, 120
    x = torch.randn(parts, 1, k, generator=gen).to(kdev) if parts > 1 else torch.randn(1, k, generator=gen).to(dtype).to(kdev)
    r = torch.randn(1, k, generator=gen).to(dtype).to(kdev)
    norm = RMSNorm(k, 1e-5).to(kdev).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype).to(kdev)
    w = (0.05 * torch.randn(2 * n if gated else n, k, generator=gen)).to(dtype).to(kdev)
    r_out = torch.full_like(r, float("nan"))
    y = kernels.gemv(x, w, gated=gated, config=config, norm=(r, r_out, norm.weight, 1e-5))
    s = (x.sum(0) if parts > 1 else x).to(dtype) + r
    assert torch.equal(r_out, s)
    hn = kernels.parts_rmsnorm(x, r, norm.weight, 1e-5)
    ref = norm(s).double() @ w.double().T
    if gated:
        g, u = ref.split(n, -1)
        ref = torch.nn.functional.silu(g) * u
    assert rel_err(y.cpu(), ref.cpu()) < (1e-5 if dtype == torch.float32 else 2e-2)
    # same roundings as the separate norm kernel + GEMV (up to the order of the float32 sum of squares)
    y2 = kernels.gemv(hn, w, gated=gated, config=config)
    assert rel_err(y.cpu(), y2.double().cpu()) < (1e-6 if dtype == torch.float32 else 1e-2)


def _decode_layer_chain(kernels, t, pdl):
    """One batch-1 decode layer of forward_small's launches, as a function of ``pdl``."""
    hn = kernels.parts_rmsnorm(t["parts"], t["res"], t["nw"], 1e-5, write_residual=True, pdl=pdl)
    qkv = kernels.gemv(hn, t["qkv_w"], bias=t["qkv_b"], pdl=pdl)
    o = kernels.decode_attention_rope(qkv, t["pos"], t["slot"], t["cos"], t["sin"], t["kc"], t["vc"], t["bt"],
                                      t["ctx"], t["h"], t["scale"], num_splits=4, pdl=pdl)
    op = kernels.gemv(o.view(1, -1), t["o_w"], can_split=True, config=(16, 64, 4, 4), pdl=pdl)
    hn = kernels.parts_rmsnorm(op, t["res"], t["nw"], 1e-5, write_residual=True, pdl=pdl)
    act = kernels.gemv(hn, t["gu_w"], gated=True, pdl=pdl)
    parts = kernels.gemv(act, t["d_w"], can_split=True, config=(8, 128, 2, 4), pdl=pdl)
    # the next layer's qkv with the norm fused (persistent tiles), then the o GEMV fused into a gated one
    qkv2 = kernels.gemv(parts, t["qkv_w"], config=(2, 256, 1, 4, 1), pdl=pdl, norm=(t["res"], t["res2"], t["nw"], 1e-5))
    act2 = kernels.gemv(o.view(1, -1), t["gu_w2"], gated=True, pdl=pdl, norm=(t["res2"], t["res3"], t["nw"], 1e-5))
    return parts, qkv, o, qkv2, act2, t["res2"], t["res3"]


def test_pdl_launches_match_plain_launches(gpu):
    """forward_small's batch-1 chain with programmatic dependent launches (eagerly and in a
    CUDA graph) gives bit-identical results to ordinary launches."""
    from llmcore_cuda import kernels

    if not kernels.pdl_supported():
        pytest.skip("programmatic dependent launch needs sm_90+")
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(21)
    hid, h, kvh, d, inter, bs = 256, 4, 2, 64, 384, 16
    k, v, tables, bt = make_paged([70], kvh, d, bs, dt, dev, gen)
    emb = torch.cat([torch.arange(128.0)[:, None] * (1.0 / (10000 ** (torch.arange(0, d, 2) / d)))[None]] * 2, -1)

    def r(*s, scale=0.05):
        return (scale * torch.randn(*s, generator=gen)).to(dt).to(dev)

    t = dict(parts=torch.randn(2, 1, hid, generator=gen).to(dev), res=r(1, hid, scale=1.0),
             nw=(1 + r(hid)), qkv_w=r((h + 2 * kvh) * d, hid), qkv_b=r((h + 2 * kvh) * d),
             o_w=r(hid, h * d), gu_w=r(2 * inter, hid), d_w=r(hid, inter), h=h, scale=d**-0.5,
             gu_w2=r(2 * inter, h * d), res2=r(1, hid), res3=r(1, h * d),
             pos=torch.tensor([69], device=dev), slot=torch.tensor([tables[0][69 // bs] * bs + 69 % bs], device=dev),
             cos=emb.cos().to(dt).to(dev), sin=emb.sin().to(dt).to(dev), bt=bt,
             ctx=torch.tensor([70], dtype=torch.int32, device=dev))
    res0 = t["res"].clone()
    outs = {}
    for mode in ("plain", "pdl", "graph"):
        t["res"].copy_(res0)
        t["kc"], t["vc"] = k.clone(), v.clone()
        if mode == "graph":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                _decode_layer_chain(kernels, t, True)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                res = _decode_layer_chain(kernels, t, True)
            for _ in range(3):
                t["res"].copy_(res0)
                g.replay()
        else:
            res = _decode_layer_chain(kernels, t, mode == "pdl")
        torch.cuda.synchronize()
        outs[mode] = [x.clone() for x in res] + [t["res"].clone(), t["kc"].clone()]
    for mode in ("pdl", "graph"):
        for a, b in zip(outs["plain"], outs[mode]):
            assert torch.equal(a, b), mode
