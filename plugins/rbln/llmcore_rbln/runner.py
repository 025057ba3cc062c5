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

Logits come back to the host and llmcore's sampler picks tokens.
"""

from __future__ import annotations

import torch

from llmcore.engine.batch import SampleResult, ScheduledBatch, ScheduledSeq
from llmcore.errors import RequestError
from llmcore.runtime.sampler import Sampler
from llmcore.runtime.slots import PAD_TOKEN, SlotTable
from llmcore.static_plan import DTYPE_BYTES

class RblnStaticRunner:
    def __init__(self, model, plan, model_config, eos_token_ids, kv_block_size: int,
                 sort_decode: bool = False, seed: int = 0) -> None:
        self.model = model
        self.plan = plan
        self.config = model_config
        self.max_seq_len = plan.max_seq_len
        self.blocks_per_slot = plan.max_seq_len // kv_block_size
        self.decode_buckets = sorted(plan.batch_buckets)
        self.sort_decode = sort_decode
        self.slots = SlotTable(plan.batch_size)
        self.sampler = Sampler(eos_token_ids, seed, torch.device("cpu"))
        self.block_size = plan.max_seq_len  # one engine "block" is one slot
        self.num_kv_blocks = 0

    def kv_bytes_per_block(self) -> int:
        return self.config.kv_bytes_per_token(DTYPE_BYTES[self.plan.dtype]) * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # the KV cache was sized at compile time and lives on the NPU
        self.num_kv_blocks = num_blocks

    def block_table(self, slot: int) -> list[int]:
        k = self.blocks_per_slot
        return list(range(slot * k, slot * k + k))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        self.slots.release(batch.finished_keys)
        self.sampler.release(batch.finished_keys)
        results: list[SampleResult | None] = [None] * len(batch.seqs)
        rows: dict[int, torch.Tensor] = {}
        decode: dict[int, tuple[int, int, int]] = {}  # slot -> (entry index, token, position)
        prefill: list[tuple[int, int, list[int]]] = []  # (entry index, slot, prompt)
        for i, s in enumerate(batch.seqs):  # every check and slot first, before any device call
            self._check(s)
            end = s.start_pos + len(s.token_ids)
            slot = self.slots.get(s.key)
            if (slot is not None and len(s.token_ids) == 1 and s.start_pos > 0
                    and self.slots.length[slot] == s.start_pos):
                decode[slot] = (i, s.token_ids[0], s.start_pos)
                continue
            slot = self.slots.assign(s.key)
            if s.sample:  # earlier prompt chunks only reserve the slot; the prompt is prefilled whole
                prefill.append((i, slot, list(s.history[:end])))
        for i, slot, tokens in prefill:
            rows[i] = self._prefill(slot, tokens)
        if decode:
            rows.update(self._decode(decode))
        sampled = [i for i, s in enumerate(batch.seqs) if s.sample and i in rows]
        if sampled:
            logits = torch.stack([rows[i] for i in sampled]).float()
            for i, res in zip(sampled, self.sampler(logits, [batch.seqs[i] for i in sampled])):
                results[i] = res
        return results

    def _check(self, s: ScheduledSeq) -> None:
        if s.want_prompt_logprobs:
            raise RequestError("prompt_logprobs", s.params.prompt_logprobs,
                               "is not available on rbln: the compiled graphs return the last "
                               "position's logits only", "Drop prompt_logprobs")
        end = s.start_pos + len(s.token_ids)
        if end > self.max_seq_len:
            raise RequestError(
                "max_seq_len", end,
                f"sequence {s.key} would hold {end} tokens, more than the compiled max_seq_len "
                f"{self.max_seq_len}",
                f"Keep prompt + max_tokens <= {self.max_seq_len}, or recompile with a larger --max-seq-len",
            )

    def _prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        out = self.model.prefill_decoder(
            input_ids=torch.tensor([tokens], dtype=torch.int64),
            cache_position=torch.arange(n, dtype=torch.int32).unsqueeze(0),
            block_tables=torch.tensor(self.block_table(slot), dtype=torch.int16),
        )
        self.slots.length[slot] = n
        self.slots.last_token[slot] = tokens[-1]
        return out.logits[0, -1]

    def _decode(self, decode: dict[int, tuple[int, int, int]]) -> dict[int, torch.Tensor]:
        bucket = next(b for b in self.decode_buckets if b >= len(decode))
        order = list(decode)
        free = [s for s in range(self.slots.num_slots) if s not in decode and self.slots.length[s] == 0]
        idle = [s for s in range(self.slots.num_slots) if s not in decode and self.slots.length[s] > 0]
        order += (free + idle)[: bucket - len(order)]
        feed = []
        for slot in order:
            if slot in decode:
                feed.append((slot, decode[slot][1], decode[slot][2]))
            elif self.slots.length[slot] > 0:
                feed.append((slot, self.slots.last_token[slot], self.slots.length[slot] - 1))
            else:
                feed.append((slot, PAD_TOKEN, 0))
        if self.sort_decode:
            feed.sort(key=lambda r: -r[2])
        out = self.model.decoders[bucket](
            input_ids=torch.tensor([[t] for _, t, _ in feed], dtype=torch.int64),
            cache_position=torch.tensor([[p] for _, _, p in feed], dtype=torch.int32),
            block_tables=torch.tensor([self.block_table(s) for s, _, _ in feed], dtype=torch.int16),
        )
        rows = {}
        for r, (slot, token, pos) in enumerate(feed):
            if slot in decode:
                self.slots.length[slot] = pos + 1
                self.slots.last_token[slot] = token
                rows[decode[slot][0]] = out.logits[r, -1]
        return rows
