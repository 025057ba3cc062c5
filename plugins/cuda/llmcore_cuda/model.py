"""The Llama-family forward pass on Triton kernels (fused norms, RoPE + KV write, SiLU).

It reuses the weights of the core :class:`~llmcore.models.llama.LlamaForCausalLM`
(no copy) and replaces its per-layer Python ops with fewer, fused launches:

    add+RMSNorm -> qkv GEMM -> RoPE+KV write -> paged attention -> o GEMM
    -> add+RMSNorm -> gate_up GEMM -> SiLU*up -> down GEMM

which matters most for decode, where each launch costs as much as the math.
Inputs are the same flat token layout as the core model.

Quantization (:mod:`llmcore.quantization`) is a module swap done by the core
runner before this class sees the model: a projection, the output projection
or the embedding that a handler replaced holds no float ``.weight`` to hand to
a GEMM, so it is *called* instead (its forward runs the method's kernel:
Triton int8/int4, eetq, bitsandbytes). Float projections, including any a
4-bit method had to keep (shape unsupported), stay on the fast paths below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmcore_cuda import kernels


@dataclass
class DecodeArgs:
    """One query per row; tensors may be strided views of the runner's static buffer."""

    block_tables: torch.Tensor  # [B, W] int32
    context_lens: torch.Tensor  # [B] int32 (0 = padding row)
    num_splits: int = 1
    workspace: tuple | None = None


@dataclass
class PrefillArgs:
    """Variable-length queries (prefill chunks, prefix hits, mixed with decodes)."""

    block_tables: torch.Tensor  # [S, W] int32
    query_starts: torch.Tensor  # [S+1] int32
    context_lens: torch.Tensor  # [S] int32
    tile_seq: torch.Tensor  # [n_tiles] int32
    tile_m: torch.Tensor  # [n_tiles] int32
    # mixed batches: single-token sequences go through the decode kernel instead
    decode_seqs: torch.Tensor | None = None  # [R] int32 sequence indices
    decode_splits: int = 1


class _Layer:
    # *_q: the quantized module swapped in for that projection (called), or None (float weight)
    __slots__ = ("qkv_w", "qkv_b", "o_w", "o_b", "gu_w", "gu_b", "d_w", "d_b", "in_w", "post_w",
                 "q_norm", "k_norm", "qkv_q", "o_q", "gu_q", "d_q")


def swapped(module: nn.Module | None) -> nn.Module | None:
    """The quantized module a handler put in place of a float layer, or None if it is float.

    Only a plain ``nn.Linear`` / ``nn.Embedding`` has a float ``.weight`` the fused kernels can
    read: bitsandbytes' layers subclass ``nn.Linear`` but hold int8/4-bit data, and the
    core's ``Int8Linear`` / ``Int4Linear`` / ``Int8Embedding`` are plain modules. A
    tensor-parallel wrapper is looked through (it only adds the all-reduce, which this
    class does itself).
    """
    if module is None:
        return None
    from llmcore.parallel.tensor_parallel import RowParallelLinear

    if isinstance(module, RowParallelLinear):
        module = module.linear
    return None if type(module) in (nn.Linear, nn.Embedding) else module


class FusedLlama:
    def __init__(self, model) -> None:
        cfg = model.config
        self.model = model
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim**-0.5
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            L = _Layer()
            L.qkv_q, L.o_q = swapped(a.qkv_proj), swapped(a.o_proj)
            L.gu_q, L.d_q = swapped(m.gate_up_proj), swapped(m.down_proj)
            # (a quantized module's .weight, if any, is its packed data: never read as float)
            L.qkv_w, L.qkv_b = (None, None) if L.qkv_q is not None else (a.qkv_proj.weight, a.qkv_proj.bias)
            L.o_w, L.o_b = (None, None) if L.o_q is not None else (a.o_proj.weight, a.o_proj.bias)
            L.gu_w, L.gu_b = (None, None) if L.gu_q is not None else (m.gate_up_proj.weight, m.gate_up_proj.bias)
            L.d_w, L.d_b = (None, None) if L.d_q is not None else (m.down_proj.weight, m.down_proj.bias)
            L.in_w = layer.input_layernorm.weight
            L.post_w = layer.post_attention_layernorm.weight
            L.q_norm = a.q_norm.weight if a.q_norm is not None else None
            L.k_norm = a.k_norm.weight if a.k_norm is not None else None
            self.layers.append(L)
        # eetq / int4 on a tied model: the embedding reads the int8 output table (Int8Embedding)
        self.embed_q = swapped(model.model.embed_tokens)
        self.embed_w = None if self.embed_q is not None else model.model.embed_tokens.weight
        self.norm_w = model.model.norm.weight
        # eetq / int4 quantize the output projection: model.logits_proj when tied, else lm_head
        self.lm_q = model.logits_proj if model.logits_proj is not None else swapped(model.lm_head)
        if self.lm_q is not None:
            self.lm_w = None
        else:
            self.lm_w = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        self.quantized = any(q is not None for L in self.layers for q in (L.qkv_q, L.o_q, L.gu_q, L.d_q)) \
            or self.embed_q is not None or self.lm_q is not None
        # batch-1 decode: Triton GEMV for every projection (else cuBLAS qkv + Triton skinny GEMMs)
        self.gemv = True
        # ... with the residual add + RMSNorm folded into the qkv and gate_up GEMVs
        h = cfg.hidden_size
        self.fuse_norm = kernels.gemv_can_fuse_norm(h)
        # programmatic dependent launch of forward_small's Triton kernels (set by the runner on
        # Hopper+, off elsewhere and in Triton's interpreter)
        self.pdl = False
        # tensor parallelism (llmcore.parallel): the model holds this rank's heads and MLP columns
        # (o/down biases on rank 0 only); the o and down GEMM outputs are summed over the ranks
        self.tp = getattr(model, "tp", None)

    def forward(self, input_ids, positions, slot_mapping, kv_caches, args) -> torch.Tensor:
        """Hidden states after the final norm, ``[T, hidden]``."""
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = self.model.rope_cos, self.model.rope_sin
        tp = self.tp
        x = self.embed(input_ids)
        residual = None
        decode = isinstance(args, DecodeArgs)
        t = x.shape[0]
        for L, (kc, vc) in zip(self.layers, kv_caches):
            hn, residual = kernels.add_rmsnorm(x, residual, L.in_w, self.eps)
            qkv = F.linear(hn, L.qkv_w, L.qkv_b) if L.qkv_q is None else L.qkv_q(hn)
            q = kernels.rope_and_cache(qkv, positions, slot_mapping, cos, sin, kc, vc, h, kvh, d,
                                       q_norm=L.q_norm, k_norm=L.k_norm, eps=self.eps)
            if decode:
                o = kernels.decode_attention(q, kc, vc, args.block_tables, args.context_lens, self.scale,
                                             num_splits=args.num_splits, workspace=args.workspace)
            else:
                o = kernels.prefill_attention(q, kc, vc, args.block_tables, args.query_starts,
                                              args.context_lens, args.tile_seq, args.tile_m, self.scale)
                if args.decode_seqs is not None:
                    kernels.decode_attention(q, kc, vc, args.block_tables, args.context_lens, self.scale,
                                             num_splits=args.decode_splits, out=o,
                                             seq_map=args.decode_seqs, query_starts=args.query_starts)
            o = o.view(t, h * d)
            x = F.linear(o, L.o_w, L.o_b) if L.o_q is None else L.o_q(o)
            if tp is not None:
                tp.all_reduce(x)
            hn, residual = kernels.add_rmsnorm(x, residual, L.post_w, self.eps)
            gu = F.linear(hn, L.gu_w, L.gu_b) if L.gu_q is None else L.gu_q(hn)
            act = kernels.silu_mul(gu)
            x = F.linear(act, L.d_w, L.d_b) if L.d_q is None else L.d_q(act)
            if tp is not None:
                tp.all_reduce(x)
        out, _ = kernels.add_rmsnorm(x, residual, self.norm_w, self.eps)
        return out

    def forward_small(self, input_ids, positions, slot_mapping, kv_caches, args: DecodeArgs) -> torch.Tensor:
        """Decode for a few rows (CUDA-graph buckets up to ``cuda_small_batch_max``).

        Per layer: RMSNorm -> qkv GEMM -> RoPE + KV write + attention (one launch, plus the
        split merge) -> o GEMM -> partial sum + residual add + RMSNorm -> gate_up GEMM with
        SiLU*up -> down GEMM; the next layer's norm sums the down partials.

        One row (batch 1, ``self.gemv``): every GEMM is :func:`kernels.gemv`; with
        ``self.fuse_norm`` the qkv and gate_up GEMVs take the previous GEMM's output and do the
        residual add + RMSNorm themselves (six launches per layer); with ``self.pdl`` every
        launch is a programmatic dependent launch that loads its weights (or cached K/V) before
        waiting for the kernel before it. Several rows:
        cuBLAS qkv, Triton split-K o/down (float32 partials summed by the next norm), gated
        gate_up where tuned faster than cuBLAS + SiLU.

        Quantized projections (``L.*_q``) are called, one or several rows: their output is a
        plain ``[M, N]`` (the norms take it as one partial), gate_up is followed by SiLU*up.
        A quantized model runs without the norm folded into the GEMVs (only the float GEMV
        can take it) and without programmatic dependent launch (the runner turns it off: the
        quantized kernels are ordinary launches, so there is no chain left to overlap).

        Tensor parallel: the o and down outputs (float32 split-K partials, or one plain output)
        are all-reduced as they are; the consumer sums the partials as before.
        """
        h, d = self.num_heads, self.head_dim
        cos, sin = self.model.rope_cos, self.model.rope_sin
        tp = self.tp
        x = self.embed(input_ids)
        m = x.shape[0]
        one = m == 1 and self.gemv
        pdl = self.pdl and one
        fuse = one and self.fuse_norm and not self.quantized
        if fuse:  # the fused GEMVs write the new residual next to the old one: two buffers, alternating
            res_bufs = (torch.empty_like(x), torch.empty_like(x))
            flip = 0
        parts = None
        for L, (kc, vc) in zip(self.layers, kv_caches):
            if parts is None:
                hn, residual = kernels.add_rmsnorm(x, None, L.in_w, self.eps, pdl=pdl)
                qkv = self._qkv_small(hn, L, one, pdl)
            elif fuse:
                new_res, flip = res_bufs[flip], flip ^ 1
                qkv = kernels.gemv(parts, L.qkv_w, bias=L.qkv_b, pdl=pdl, norm=(residual, new_res, L.in_w, self.eps))
                residual = new_res
            else:
                hn = kernels.parts_rmsnorm(parts, residual, L.in_w, self.eps, write_residual=True, pdl=pdl)
                qkv = self._qkv_small(hn, L, one, pdl)
            o = kernels.decode_attention_rope(
                qkv, positions, slot_mapping, cos, sin, kc, vc, args.block_tables, args.context_lens, h,
                self.scale, num_splits=args.num_splits, workspace=args.workspace, q_norm=L.q_norm,
                k_norm=L.k_norm, eps=self.eps, pdl=pdl)
            if one:
                o = o.view(m, h * d)
                o_parts = kernels.gemv(o, L.o_w, bias=L.o_b, can_split=True, pdl=pdl) if L.o_q is None else L.o_q(o)
                if tp is not None:
                    tp.all_reduce(o_parts)
                if fuse:
                    new_res, flip = res_bufs[flip], flip ^ 1
                    act = kernels.gemv(o_parts, L.gu_w, bias=L.gu_b, gated=True, pdl=pdl,
                                       norm=(residual, new_res, L.post_w, self.eps))
                    residual = new_res
                else:
                    hn = kernels.parts_rmsnorm(o_parts, residual, L.post_w, self.eps, write_residual=True, pdl=pdl)
                    if L.gu_q is None:
                        act = kernels.gemv(hn, L.gu_w, bias=L.gu_b, gated=True, pdl=pdl)
                    else:
                        act = kernels.silu_mul(L.gu_q(hn))
                if L.d_q is None:
                    parts = kernels.gemv(act, L.d_w, bias=L.d_b, can_split=True, pdl=pdl)
                else:
                    parts = L.d_q(act)
                if tp is not None:
                    tp.all_reduce(parts)
                continue
            o = o.view(m, h * d)
            o_parts = kernels.small_gemm(o, L.o_w, bias=L.o_b) if L.o_q is None else L.o_q(o)
            if tp is not None:
                tp.all_reduce(o_parts)
            hn = kernels.parts_rmsnorm(o_parts, residual, L.post_w, self.eps, write_residual=True)
            if L.gu_q is not None:
                act = kernels.silu_mul(L.gu_q(hn))
            elif (L.gu_w.shape[0] // 2, L.gu_w.shape[1], True) in kernels.GEMM_CONFIGS:  # tuned faster
                act = kernels.small_gemm(hn, L.gu_w, bias=L.gu_b, gated=True)
            else:
                act = kernels.silu_mul(F.linear(hn, L.gu_w, L.gu_b))
            parts = kernels.small_gemm(act, L.d_w, bias=L.d_b) if L.d_q is None else L.d_q(act)
            if tp is not None:
                tp.all_reduce(parts)
        return kernels.parts_rmsnorm(parts, residual, self.norm_w, self.eps, pdl=pdl)

    def _qkv_small(self, hn, L: _Layer, one: bool, pdl: bool) -> torch.Tensor:
        if L.qkv_q is not None:
            return L.qkv_q(hn)
        return kernels.gemv(hn, L.qkv_w, bias=L.qkv_b, pdl=pdl) if one else F.linear(hn, L.qkv_w, L.qkv_b)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_w) if self.embed_q is None else self.embed_q(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_w) if self.lm_q is None else self.lm_q(hidden)
