"""The per-step wire format between rank 0 and the workers of a tensor-parallel group.

Rank 0 pickles one message per step; every worker decodes it into the same
:class:`~llmcore.contract.ScheduledBatch` rank 0 executes.
"""

from __future__ import annotations

from typing import Any

from llmcore.contract import ScheduledBatch, ScheduledSeq


class BatchEncoder:
    """A ScheduledBatch as rank 0 sends it: compact tuples, each request's SamplingParams once.

    Workers run the same forward but sample nothing, so token histories go along only where
    prompt logprobs read them. Params are sent the first step a sequence key appears and
    forgotten (on both sides) when the scheduler reports the key finished.
    """

    def __init__(self) -> None:
        self.sent: dict[str, Any] = {}

    def encode(self, batch) -> tuple:
        sent = self.sent
        for k in batch.finished_keys:  # first: a finished key may come back as a new request
            sent.pop(k, None)
        new = {}
        seqs = []
        for s in batch.seqs:
            if sent.get(s.key) is not s.params:
                sent[s.key] = new[s.key] = s.params
            seqs.append((s.seq_id, s.key, s.token_ids, s.start_pos, s.block_table,
                         s.history if s.want_prompt_logprobs else (), s.num_prompt_tokens, s.sample,
                         s.num_samples, s.seeds, s.rng_keys, s.want_prompt_logprobs))
        return ("execute", seqs, new, batch.block_copies, batch.finished_keys)


class BatchDecoder:
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def decode(self, msg: tuple):
        _, seqs, new, copies, finished = msg
        params = self.params
        for k in finished:
            params.pop(k, None)
        params.update(new)
        out = [ScheduledSeq(seq_id=t[0], key=t[1], token_ids=t[2], start_pos=t[3], block_table=t[4],
                            params=params[t[1]], history=t[5], num_prompt_tokens=t[6], sample=t[7],
                            num_samples=t[8], seeds=t[9], rng_keys=t[10], want_prompt_logprobs=t[11])
               for t in seqs]
        return ScheduledBatch(out, copies, finished)
