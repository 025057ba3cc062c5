"""Fixed batch slots for static-graph runners (neuron, rbln, and any compiled device).

A static graph has ``batch_size`` KV regions; each live sequence (keyed by its
``ScheduledSeq.key``, stable across preemption) holds one until it leaves.
:class:`StaticSlotRunner` is the runner half every such device shares.
"""

from __future__ import annotations

from typing import Any

import torch

from llmcore.compiled.plan import DTYPE_BYTES
from llmcore.contract import SampleResult, ScheduledBatch, ScheduledSeq
from llmcore.errors import RequestError
from llmcore.runtime.sampler import Sampler

PAD_TOKEN = 0


class SlotTable:
    """Which sequence key holds which slot, and what that slot's KV holds."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.by_key: dict[str, int] = {}
        self.length: list[int] = [0] * num_slots  # tokens in the slot's KV (0: free or pending)
        self.last_token: list[int] = [PAD_TOKEN] * num_slots

    def get(self, key: str) -> int | None:
        return self.by_key.get(key)

    def assign(self, key: str) -> int:
        slot = self.by_key.get(key)
        if slot is None:
            used = set(self.by_key.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if not free:
                raise RequestError(
                    "batch", len(used) + 1,
                    f"exceeds the compiled batch size {self.num_slots} (slots held by "
                    f"{', '.join(sorted(self.by_key))})",
                    f"Serve at most {self.num_slots} sequences at once, or recompile with a larger "
                    "--batch-size",
                )
            slot = self.by_key[key] = free[0]
        self.length[slot] = 0
        return slot

    def release(self, keys) -> None:
        for key in keys:
            slot = self.by_key.pop(key, None)
            if slot is not None:
                self.length[slot] = 0
                self.last_token[slot] = PAD_TOKEN

    def filler(self, slot: int) -> tuple[int, int]:
        """(token, position) that keeps an unscheduled slot's KV intact when a graph must feed it:
        a live slot re-feeds its last token at its own position (rewriting the same KV entry),
        a free slot gets the pad token at position 0."""
        if self.length[slot] > 0:
            return self.last_token[slot], self.length[slot] - 1
        return PAD_TOKEN, 0


#: decode work of one step: slot -> (index in the batch, token, position)
Decode = dict[int, tuple[int, int, int]]


class StaticSlotRunner:
    """The engine-facing half of a static-graph runner; a device plugin adds the graph calls.

    Every sequence owns one of ``plan.batch_size`` slots from its first prompt chunk until it
    appears in ``finished_keys``. A step first checks every sequence and assigns every slot
    (so a refusal happens before any device call), then prefills whole prompts one by one
    (:meth:`prefill`: the compiled prefill graph takes one prompt), then runs one decode graph
    for all decoding slots (:meth:`decode`), and samples on the host from the returned logits.
    One engine "block" is one slot's whole KV region, which the compiled graphs own.
    """

    #: the device's name in error messages
    device_name = "static"
    #: a one-token prompt runs the decode graph at position 0 (for SDKs whose prefill graph
    #: is selected by the prompt having more than one token)
    single_token_prompt_decodes = False

    def __init__(self, model: Any, plan: Any, model_config: Any, eos_token_ids: list[int],
                 seed: int = 0) -> None:
        self.model = model
        self.plan = plan
        self.config = model_config
        self.max_seq_len = plan.max_seq_len
        self.slots = SlotTable(plan.batch_size)
        self.sampler = Sampler(eos_token_ids, seed, torch.device("cpu"))
        self.block_size = plan.max_seq_len
        self.num_kv_blocks = 0
        self.slot_params: dict[int, Any] = {}  # slot -> SamplingParams of the sequence holding it

    def kv_bytes_per_block(self) -> int:
        return self.config.kv_bytes_per_token(DTYPE_BYTES[self.plan.dtype]) * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # the compiled graphs hold the KV cache (batch_size regions) on the device
        self.num_kv_blocks = num_blocks

    def prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """Prefill ``tokens`` (a whole prompt) into ``slot``; the last position's logits [vocab]."""
        raise NotImplementedError

    def decode(self, decode: Decode) -> dict[int, torch.Tensor]:
        """One decode step for ``decode``'s slots; logits [vocab] by batch index."""
        raise NotImplementedError

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        for key in batch.finished_keys:
            self.slot_params.pop(self.slots.get(key), None)
        self.slots.release(batch.finished_keys)
        self.sampler.release(batch.finished_keys)
        results: list[SampleResult | None] = [None] * len(batch.seqs)
        rows: dict[int, torch.Tensor] = {}
        decode: Decode = {}
        prefill: list[tuple[int, int, list[int]]] = []  # (batch index, slot, prompt)
        for i, s in enumerate(batch.seqs):  # every check and slot first, before any device call
            self.check(s)
            end = s.start_pos + len(s.token_ids)
            slot = self.slots.get(s.key)
            if (slot is not None and len(s.token_ids) == 1 and s.start_pos > 0
                    and self.slots.length[slot] == s.start_pos):
                decode[slot] = (i, s.token_ids[0], s.start_pos)
                self.slot_params[slot] = s.params
                continue
            slot = self.slots.assign(s.key)
            self.slot_params[slot] = s.params
            if not s.sample:
                continue  # an earlier prompt chunk only reserves the slot; the prompt is prefilled whole
            tokens = list(s.history[:end])
            if len(tokens) == 1 and self.single_token_prompt_decodes:
                decode[slot] = (i, tokens[0], 0)
            else:
                prefill.append((i, slot, tokens))
        for i, slot, tokens in prefill:
            rows[i] = self.prefill(slot, tokens)
            self.slots.length[slot] = len(tokens)
            self.slots.last_token[slot] = tokens[-1]
        if decode:
            rows.update(self.decode(decode))
            for slot, (_, token, pos) in decode.items():
                self.slots.length[slot] = pos + 1
                self.slots.last_token[slot] = token
        sampled = [i for i, s in enumerate(batch.seqs) if s.sample and i in rows]
        if sampled:
            for i, res in zip(sampled, self.sample([rows[i] for i in sampled], [batch.seqs[i] for i in sampled])):
                results[i] = res
        return results

    def sample(self, rows: list[torch.Tensor], seqs: list[ScheduledSeq]) -> list[SampleResult]:
        """Pick the next tokens from the graphs' last-position logits, on the host."""
        return self.sampler(torch.stack(rows).float(), seqs)

    def check(self, s: ScheduledSeq) -> None:
        if s.want_prompt_logprobs:
            raise RequestError("prompt_logprobs", s.params.prompt_logprobs,
                               f"is not available on {self.device_name}: the compiled graphs return the "
                               "last position's logits only", "Drop prompt_logprobs")
        end = s.start_pos + len(s.token_ids)
        if end > self.max_seq_len:
            raise RequestError(
                "max_seq_len", end,
                f"sequence {s.key} would hold {end} tokens, more than the compiled max_seq_len "
                f"{self.max_seq_len}",
                f"Keep prompt + max_tokens <= {self.max_seq_len}, or recompile with a larger --max-seq-len",
            )
