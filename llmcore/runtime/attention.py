"""Attention over the paged KV cache: the torch reference backend.

The KV cache of one layer is two tensors ``[num_blocks, block_size,
num_kv_heads, head_dim]``. A token at position ``p`` of a sequence lives in
slot ``block_table[p // block_size] * block_size + p % block_size``.

Backends (CPU torch here, Triton on CUDA in ``llmcore_cuda``) implement
:class:`~llmcore.contract.AttentionBackend` (defined, with :class:`AttentionMetadata`, in the
contract module so models need not import the runtime); the model calls ``backend.forward``
once per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.contract import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchPagedAttention"]


class TorchPagedAttention(AttentionBackend):
    """Reference backend on plain torch ops (gather + SDPA); runs on any torch device."""

    name = "torch-sdpa"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        num_blocks, block_size, kvh, d = k_cache.shape
        k_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)
        if meta.decode_only:
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        for i, (qs, ql, cl, table) in enumerate(
            zip(meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables)
        ):
            qi = q[qs : qs + ql].transpose(0, 1).unsqueeze(0)  # [1, H, ql, D]
            if ql == cl:  # whole sequence computed now: no need to read the cache back
                ki, vi = k[qs : qs + ql], v[qs : qs + ql]
            else:
                idx = torch.tensor(table, dtype=torch.long, device=k_cache.device)
                ki = k_cache.index_select(0, idx).view(-1, kvh, d)[:cl]
                vi = v_cache.index_select(0, idx).view(-1, kvh, d)[:cl]
            ki = ki.transpose(0, 1).unsqueeze(0)
            vi = vi.transpose(0, 1).unsqueeze(0)
            if ql == 1:
                o = F.scaled_dot_product_attention(qi, ki, vi, scale=scale, enable_gqa=True)
            elif ql == cl:
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
            else:
                # query j sits at position cl - ql + j and sees keys 0 .. cl - ql + j
                qpos = torch.arange(cl - ql, cl, device=q.device)[:, None]
                kpos = torch.arange(cl, device=q.device)[None, :]
                o = F.scaled_dot_product_attention(
                    qi, ki, vi, attn_mask=kpos <= qpos, scale=scale, enable_gqa=True
                )
            out[qs : qs + ql] = o[0].transpose(0, 1)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, scale):
        num_blocks, block_size, kvh, d = k_cache.shape
        tables = meta.block_table_tensor
        lens = meta.context_lens_tensor
        b = tables.shape[0]
        max_len = tables.shape[1] * block_size
        kk = k_cache[tables].view(b, max_len, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
        vv = v_cache[tables].view(b, max_len, kvh, d).transpose(1, 2)
        qq = q.unsqueeze(2)  # [B, H, 1, D]
        if b == 1:
            n = int(meta.context_lens[0])
            o = F.scaled_dot_product_attention(
                qq, kk[:, :, :n], vv[:, :, :n], scale=scale, enable_gqa=True
            )
            return o.squeeze(2)
        # Batched decode: grouped matmuls instead of a masked SDPA with enable_gqa, which
        # repeats K/V for every query head (measured 2x slower on the CPU at batch 64).
        h = q.shape[1]
        g = h // kvh
        qg = q.view(b, kvh, g, d)
        scores = torch.matmul(qg, kk.transpose(-1, -2)).float() * scale  # [B, KVH, G, L]
        mask = torch.arange(max_len, device=q.device)[None, :] >= lens[:, None]
        scores.masked_fill_(mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(vv.dtype)
        return torch.matmul(probs, vv).view(b, h, d)
