"""Triton paged attention behind the core :class:`AttentionBackend` interface.

The CUDA runner's hot paths call the kernels directly through
:class:`llmcore_cuda.model.FusedLlama`; this backend serves the core model's
own forward (prompt logprobs, embeddings) with the same kernels, so every path
on CUDA reads the paged cache the same way.
"""

from __future__ import annotations

import torch

from llmcore.runtime.attention import AttentionBackend


class TritonPagedAttention(AttentionBackend):
    name = "triton-paged"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        from llmcore_cuda import kernels

        num_blocks, block_size, kvh, d = k_cache.shape
        k_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        dev = q.device
        width = max(len(t) for t in meta.block_tables)
        bt = torch.zeros((len(meta.block_tables), width), dtype=torch.int32)
        for i, t in enumerate(meta.block_tables):
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        starts = list(meta.query_starts) + [meta.query_starts[-1] + meta.query_lens[-1]]
        ts, tm = kernels.prefill_tiles(meta.query_lens)
        i32 = dict(dtype=torch.int32)
        return kernels.prefill_attention(
            q.contiguous(), k_cache, v_cache, bt.to(dev),
            torch.tensor(starts, **i32).to(dev), torch.tensor(meta.context_lens, **i32).to(dev),
            torch.tensor(ts, **i32).to(dev), torch.tensor(tm, **i32).to(dev), scale,
        )
