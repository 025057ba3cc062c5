"""Serving a compiled Neuron model with fixed slots.

The compiled model owns the KV cache: one region per slot (``seq_ids``). A
sequence is keyed by ``ScheduledSeq.key`` ("request:index"), which is stable
across preemption, and holds a slot until it appears in ``finished_keys``.

How optimum-neuron 0.4's NxD graphs must be driven (see its generation mixin
and vLLM runner):

* prefill: ``forward(input_ids[1, n], position_ids[1, n] = 0..n-1, seq_ids=[slot])``
  runs the context-encoding graph (it right-pads to ``sequence_length``
  itself; left padding is refused by the SDK). A 1-token prompt does not select
  that graph, so it goes through decode at position 0, which is equivalent.
* decode: ``forward(input_ids[B, 1], position_ids[B, 1], seq_ids[B])``. With
  fewer than B rows the SDK pads by replaying row 0 into the missing seq_ids,
  which would overwrite KV of live slots, so every decode passes all B slots:
  idle live slots re-feed their last token at its own position (rewrites the
  same KV), free slots get a pad token at position 0.

Logits come back to the host (``on_device_sampling=False``) and llmcore's
sampler picks tokens, so every sampling option behaves as on cpu.
"""

from __future__ import annotations

import torch

from llmcore.engine.batch import SampleResult, ScheduledBatch, ScheduledSeq
from llmcore.errors import RequestError
from llmcore.runtime.sampler import Sampler
from llmcore.runtime.slots import PAD_TOKEN, SlotTable
from llmcore.static_plan import DTYPE_BYTES

class NeuronStaticRunner:
    def __init__(self, model, plan, model_config, eos_token_ids, seed: int = 0) -> None:
        self.model = model
        self.plan = plan
        self.config = model_config
        self.max_seq_len = plan.max_seq_len
        self.slots = SlotTable(plan.batch_size)
        self.sampler = Sampler(eos_token_ids, seed, torch.device("cpu"))
        # one "block" is one slot's whole KV region
        self.block_size = plan.max_seq_len
        self.num_kv_blocks = 0

    def kv_bytes_per_block(self) -> int:
        return self.config.kv_bytes_per_token(DTYPE_BYTES[self.plan.dtype]) * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # the compiled graphs hold the KV cache (batch_size regions); nothing to allocate
        self.num_kv_blocks = num_blocks

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
            if not s.sample:
                continue  # a prompt chunk: prefilled in one pass once its last chunk arrives
            tokens = list(s.history[:end])
            if len(tokens) == 1:
                decode[slot] = (i, tokens[0], 0)
            else:
                prefill.append((i, slot, tokens))
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
                               "is not available on neuron: the compiled graphs return the last "
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
        out = self.model.forward(
            input_ids=torch.tensor([tokens], dtype=torch.long),
            position_ids=torch.arange(n, dtype=torch.long).unsqueeze(0),
            seq_ids=torch.tensor([slot], dtype=torch.long),
            sampling_params=_sampling_params(1),
        )
        self.slots.length[slot] = n
        self.slots.last_token[slot] = tokens[-1]
        return out[0, -1]

    def _decode(self, decode: dict[int, tuple[int, int, int]]) -> dict[int, torch.Tensor]:
        tokens, positions = [], []
        for slot in range(self.slots.num_slots):
            if slot in decode:
                _, token, pos = decode[slot]
            elif self.slots.length[slot] > 0:  # live but not scheduled: rewrite its last KV entry
                token, pos = self.slots.last_token[slot], self.slots.length[slot] - 1
            else:
                token, pos = PAD_TOKEN, 0
            tokens.append([token])
            positions.append([pos])
        out = self.model.forward(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
            seq_ids=torch.arange(self.slots.num_slots, dtype=torch.long),
            sampling_params=_sampling_params(self.slots.num_slots),
        )
        rows = {}
        for slot, (i, token, pos) in decode.items():
            self.slots.length[slot] = pos + 1
            self.slots.last_token[slot] = token
            rows[i] = out[slot, -1]
        return rows


def _sampling_params(n: int) -> torch.Tensor:
    """[top_k, top_p, temperature] per row; the graphs ignore it without on-device sampling."""
    return torch.tensor([[1.0, 1.0, 1.0]] * n, dtype=torch.float32)
