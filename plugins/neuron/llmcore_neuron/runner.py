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
sampler picks tokens, so every sampling option behaves as on cpu. Slots, checks
and sampling are :class:`~llmcore.compiled.slots.StaticSlotRunner`'s.
"""

from __future__ import annotations

import torch

from llmcore.compiled.slots import Decode, StaticSlotRunner


class NeuronStaticRunner(StaticSlotRunner):
    device_name = "neuron"
    single_token_prompt_decodes = True  # a 1-token prompt does not select the context-encoding graph

    def prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        out = self.model.forward(
            input_ids=torch.tensor([tokens], dtype=torch.long),
            position_ids=torch.arange(n, dtype=torch.long).unsqueeze(0),
            seq_ids=torch.tensor([slot], dtype=torch.long),
            sampling_params=_sampling_params(1),
        )
        return out[0, -1]

    def decode(self, decode: Decode) -> dict[int, torch.Tensor]:
        tokens, positions = [], []
        for slot in range(self.slots.num_slots):
            token, pos = decode[slot][1:] if slot in decode else self.slots.filler(slot)
            tokens.append([token])
            positions.append([pos])
        out = self.model.forward(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
            seq_ids=torch.arange(self.slots.num_slots, dtype=torch.long),
            sampling_params=_sampling_params(self.slots.num_slots),
        )
        return {i: out[slot, -1] for slot, (i, _, _) in decode.items()}


def _sampling_params(n: int) -> torch.Tensor:
    """[top_k, top_p, temperature] per row; the graphs ignore it without on-device sampling."""
    return torch.tensor([[1.0, 1.0, 1.0]] * n, dtype=torch.float32)
