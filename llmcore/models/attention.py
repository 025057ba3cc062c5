"""The attention interface the models are written against.

The KV cache of one layer is two tensors ``[num_blocks, block_size,
num_kv_heads, head_dim]``. A token at position ``p`` of a sequence lives in
slot ``block_table[p // block_size] * block_size + p % block_size``.

A model calls ``backend.forward`` once per layer; backends (the torch reference in
:mod:`llmcore.runtime.attention`, Triton in ``llmcore_cuda``) implement
:class:`AttentionBackend`. The interface sits beside the models so that the models never
import the runtime that drives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Per-step description of where each token's KV goes and what it attends to."""

    slot_mapping: torch.Tensor  # [T] int64
    # per sequence, in batch order
    query_starts: list[int]  # offset of the sequence's first query token in the flat batch
    query_lens: list[int]
    context_lens: list[int]  # tokens in the cache after this step (incl. new ones)
    block_tables: list[list[int]]
    # decode-only fast path (every query_len == 1)
    decode_only: bool = False
    block_table_tensor: torch.Tensor | None = None  # [B, max_blocks] int64
    context_lens_tensor: torch.Tensor | None = None  # [B] int64
    extra: dict = field(default_factory=dict)  # backend-specific precomputed data


class AttentionBackend:
    """Writes new K/V into the cache and attends over each sequence's context."""

    name = "abstract"

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        raise NotImplementedError
