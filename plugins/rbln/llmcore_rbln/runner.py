"""Serving a compiled RBLN decoder with fixed slots.

The NPU holds the KV cache in ``kvcache_num_blocks`` blocks. This runner owns
the block tables (the SDK's "external block tables" mode, as vllm-rbln uses
it): slot ``s`` always owns blocks ``s*k .. s*k+k-1`` with ``k = max_seq_len /
kvcache_block_size``. A sequence is keyed by ``ScheduledSeq.key`` and holds a
slot until it appears in ``finished_keys``.

* prefill: ``model.prefill_decoder(input_ids[1, n] int64, cache_position[1, n] int32 = 0..n-1,
  block_tables[k] int16)``; the runtime splits the prompt into ``prefill_chunk_size`` chunks.
* decode: ``model.decoders[b](input_ids[b, 1] int64, cache_position[b, 1] int32,
  block_tables[b, k] int16)`` with ``b`` the smallest compiled decode batch that
  fits. Extra rows use other slots' own blocks: a free slot at position 0, or a
  live idle slot re-feeding its last token at its own position (rewrites the
  same KV), so no live sequence's KV is touched. Artifacts compiled with
  ``_requires_batch_sort`` get their rows ordered by position, longest first.

Logits come back to the host and llmcore's sampler picks tokens. Slots, checks
and sampling are :class:`~llmcore.compiled.slots.StaticSlotRunner`'s.
"""

from __future__ import annotations

import torch

from llmcore.compiled.slots import Decode, StaticSlotRunner


class RblnStaticRunner(StaticSlotRunner):
    device_name = "rbln"

    def __init__(self, model, plan, model_config, eos_token_ids, kv_block_size: int,
                 sort_decode: bool = False, seed: int = 0) -> None:
        super().__init__(model, plan, model_config, eos_token_ids, seed=seed)
        self.blocks_per_slot = plan.max_seq_len // kv_block_size
        self.decode_buckets = sorted(plan.batch_buckets)
        self.sort_decode = sort_decode

    def block_table(self, slot: int) -> list[int]:
        k = self.blocks_per_slot
        return list(range(slot * k, slot * k + k))

    def prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        out = self.model.prefill_decoder(
            input_ids=torch.tensor([tokens], dtype=torch.int64),
            cache_position=torch.arange(len(tokens), dtype=torch.int32).unsqueeze(0),
            block_tables=torch.tensor(self.block_table(slot), dtype=torch.int16),
        )
        return out.logits[0, -1]

    def decode(self, decode: Decode) -> dict[int, torch.Tensor]:
        bucket = next(b for b in self.decode_buckets if b >= len(decode))
        others = [s for s in range(self.slots.num_slots) if s not in decode]
        free = [s for s in others if self.slots.length[s] == 0]
        idle = [s for s in others if self.slots.length[s] > 0]
        order = list(decode) + (free + idle)[: bucket - len(decode)]
        feed = [(slot, *(decode[slot][1:] if slot in decode else self.slots.filler(slot))) for slot in order]
        if self.sort_decode:
            feed.sort(key=lambda r: -r[2])
        out = self.model.decoders[bucket](
            input_ids=torch.tensor([[t] for _, t, _ in feed], dtype=torch.int64),
            cache_position=torch.tensor([[p] for _, _, p in feed], dtype=torch.int32),
            block_tables=torch.tensor([self.block_table(s) for s, _, _ in feed], dtype=torch.int16),
        )
        return {decode[slot][0]: out.logits[r, -1] for r, (slot, _, _) in enumerate(feed) if slot in decode}
