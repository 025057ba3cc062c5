"""Requests and their sequences (one per sample), as the scheduler sees them."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from llmcore.outputs import Logprob
from llmcore.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One stream of tokens sharing a request's prompt.

    ``num_computed_tokens`` counts tokens whose KV is in the cache. Everything
    from there to the end of ``token_ids`` is computed by the next steps, which
    makes prefill, chunked prefill, decode and resume-after-preemption the same
    operation.
    """

    request: "Request"
    index: int
    token_ids: list[int]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # the engine core's (why it stopped scheduling the sequence)
    num_preemptions: int = 0
    # bumped when an entry of block_table already held changes (copy-on-write, free): runners
    # may cache a sequence's table row while (seq_id, blocks_version, len(block_table)) match
    blocks_version: int = 0
    # trailing entries of token_ids sampled by a launched step whose result is not read yet
    # (PLACEHOLDER_TOKEN; overlapped execution only, at most one)
    num_placeholders: int = 0
    # the output side's (llmcore.engine.output): detokenized text, tokens shown, final reason
    text: str = ""
    detok: Any = None
    out_len: int = 0
    out_reason: str | None = None
    out_stop_reason: str | int | None = None
    # (key, seeds, rng_keys) of its ScheduledSeq entries with one sample, built once
    keys: tuple | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    # final output only, no stop strings, no logprobs: the core counts its tokens itself and
    # hands the output side only the last (OutputProcessor.start / record)
    quiet: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def arrival(self) -> tuple[float, int]:
        return (self.request.arrival_time, self.seq_id)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_placeholders]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_placeholders - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    aborted: bool = False
    # build a RequestOutput only when the request finishes (generate()), not at every step
    final_only: bool = False

    # fixed when added (the engine thread reads these per token): the next step needs this step's
    # token on the host (penalties over the real history, the grammar's next mask)
    needs_host_history: bool = False
    # token ids that end a sample once min_tokens are out: stop_token_ids, plus EOS unless
    # ignore_eos (OutputProcessor.start fills in the tokenizer's EOS ids)
    stop_ids: frozenset = frozenset()

    def __post_init__(self) -> None:
        p = self.params
        self.needs_host_history = p.needs_penalties or p.structured_output is not None
        self.stop_ids = frozenset(p.stop_token_ids)
        if not self.seqs:
            seq = Sequence(self, 0, list(self.prompt_token_ids))
            seq.num_prompt_tokens = len(self.prompt_token_ids)
            self.seqs.append(seq)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def output_done(self) -> bool:
        """Every sample's output is final (the output side's view; the core may lag behind it)."""
        seqs = self.seqs
        if len(seqs) == 1:  # the common case, asked per request per step while streaming
            return seqs[0].out_reason is not None and (self.forked or self.params.n == 1)
        return (self.forked or self.params.n == 1) and all(s.out_reason is not None for s in seqs)
