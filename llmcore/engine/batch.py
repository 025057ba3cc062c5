"""Boundary objects between the scheduler and a device's runner.

The scheduler fills a :class:`ScheduledBatch`; the runner (the only code that
touches tensors) executes it and returns one :class:`SampleResult` per entry
whose ``sample`` flag is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

from llmcore.outputs import Logprob
from llmcore.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledSeq:
    seq_id: int
    # stable across preemption: "request_id:sample_index" (static devices key slots by it)
    key: str
    # the tokens computed this step, at positions start_pos .. start_pos + len - 1
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    params: SamplingParams
    # all tokens so far (prompt + output), for penalties; read only
    history: Seq[int]
    num_prompt_tokens: int
    # True when this chunk ends at the sequence's last token: sample the next one
    sample: bool = True
    # > 1 when a prompt finishes prefill for a request with n > 1 samples
    num_samples: int = 1
    # per-sample seeds (None = engine RNG); same length as num_samples
    seeds: list[int | None] = field(default_factory=list)
    # per-sample keys of the runner's RNG streams ("request_id:sample_index")
    rng_keys: list[str] = field(default_factory=list)
    want_prompt_logprobs: bool = False

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    # copy-on-write (src_block, dst_block) pairs to apply before the forward pass
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # keys ("request_id:index") of sequences that left the engine since the last
    # step: the runner frees per-sequence state (RNG streams, static slots)
    finished_keys: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return all(len(s.token_ids) == 1 for s in self.seqs)


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]  # one per sample
    # per sample: {chosen: Logprob, alternatives...} when logprobs were asked for
    logprobs: list[dict[int, Logprob]] | None = None
    # the chosen tokens' logprobs (always filled, cheap), for cumulative_logprob
    chosen_logprobs: list[float] | None = None
    # for the prompt tokens of this chunk (position i predicts token i+1)
    prompt_logprobs: list[dict[int, Logprob]] | None = None
