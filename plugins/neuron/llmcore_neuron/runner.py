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

By default logits come back to the host (``on_device_sampling=False``) and
llmcore's sampler picks tokens, so every sampling option behaves as on cpu. An
artifact compiled with on-device sampling (``--on-device-sampling``, what
optimum-neuron's own exports and hub cache use) returns one token per row,
sampled on the NeuronCores from each row's ``[top_k, top_p, temperature]``;
requests that need logits on the host (logprobs, penalties, min_p, seed,
min_tokens) are refused with the option named. Slots, checks
and sampling are :class:`~llmcore.compiled.slots.StaticSlotRunner`'s.
"""

from __future__ import annotations

import torch

from llmcore.compiled.slots import Decode, StaticSlotRunner
from llmcore.contract import SampleResult, ScheduledSeq
from llmcore.errors import RequestError

#: optimum-neuron NxDNeuronConfig.max_topk default: the largest top_k the compiled sampler takes
MAX_TOPK = 256


class NeuronStaticRunner(StaticSlotRunner):
    device_name = "neuron"
    single_token_prompt_decodes = True  # a 1-token prompt does not select the context-encoding graph

    def __init__(self, model, plan, model_config, eos_token_ids, seed: int = 0,
                 on_device_sampling: bool = False) -> None:
        super().__init__(model, plan, model_config, eos_token_ids, seed=seed)
        self.on_device_sampling = on_device_sampling

    def check(self, s: ScheduledSeq) -> None:
        super().check(s)
        if not self.on_device_sampling:
            return
        p = s.params
        needs_logits = {
            "logprobs": p.logprobs is not None, "min_p": p.min_p > 0, "seed": p.seed is not None,
            "min_tokens": p.min_tokens > 0, "repetition_penalty": p.repetition_penalty != 1.0,
            "presence_penalty": p.presence_penalty != 0.0, "frequency_penalty": p.frequency_penalty != 0.0,
        }
        for option, asked in needs_logits.items():
            if asked:
                raise RequestError(option, getattr(p, option),
                                   "needs logits on the host, but this Neuron artifact samples on the device "
                                   "(top_k, top_p, temperature only)",
                                   f"Drop {option}, or recompile without --on-device-sampling")

    def sample(self, rows: list[torch.Tensor], seqs: list[ScheduledSeq]) -> list[SampleResult]:
        if not self.on_device_sampling:
            return super().sample(rows, seqs)
        return [SampleResult(token_ids=[int(t)]) for t in rows]

    def _row(self, out: torch.Tensor, row: int) -> torch.Tensor:
        """Row ``row``'s logits [vocab], or its token id when the graphs sample on the device."""
        return out.reshape(out.shape[0], -1)[row, 0] if self.on_device_sampling else out[row, -1]

    def _sampling_params(self, slots: list[int]) -> torch.Tensor:
        """[top_k, top_p, temperature] per row (the graphs read it only with on-device sampling)."""
        rows = []
        for slot in slots:
            p = self.slot_params.get(slot)
            if p is None or p.temperature == 0:
                rows.append([1.0, 1.0, 1.0])  # greedy: top_k 1
            else:
                top_k = p.top_k if 0 < p.top_k <= MAX_TOPK else MAX_TOPK
                rows.append([float(top_k), float(p.top_p), float(p.temperature)])
        return torch.tensor(rows, dtype=torch.float32)

    def prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        out = self.model.forward(
            input_ids=torch.tensor([tokens], dtype=torch.long),
            position_ids=torch.arange(n, dtype=torch.long).unsqueeze(0),
            seq_ids=torch.tensor([slot], dtype=torch.long),
            sampling_params=self._sampling_params([slot]),
        )
        return self._row(out, 0)

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
            sampling_params=self._sampling_params(list(range(self.slots.num_slots))),
        )
        return {i: self._row(out, slot) for slot, (i, _, _) in decode.items()}
