"""Which sequences run this step, and how many of their tokens. Policy only.

Policy (stated because users depend on it):

* **FCFS by arrival.** Running sequences are served first, oldest first, then
  waiting ones in arrival order; a waiting request never jumps an older one.
* **Token budget.** Each step computes at most ``max_num_batched_tokens``
  tokens. Decodes (1 token each) go first, so a long prompt arriving does not
  stall them; the prompt is prefilled in chunks with what is left (chunked
  prefill). While others are running, one sequence's chunk is capped at
  ``long_prefill_threshold`` (default a quarter of the budget) so requests
  arriving behind a long prompt still get their first token quickly.
* **Preemption by recompute.** When blocks run out, the most recently arrived
  running sequence gives up its blocks and returns to the front of the waiting
  queue with its generated tokens kept; it recomputes them when resumed, so
  greedy output is unchanged and nothing is lost. The oldest sequence is never
  preempted for a younger one, so no request starves.
"""

from __future__ import annotations

import logging
from collections import deque

from llmcore.contract import ScheduledBatch, ScheduledSeq
from llmcore.engine.block_manager import BlockManager
from llmcore.engine.sequence import Sequence, SeqStatus

log = logging.getLogger("llmcore.scheduler")


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        long_prefill_threshold: int | None = None,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # cap on one sequence's prefill chunk per step, so a long prompt leaves budget
        # for requests arriving behind it (their first token is not stuck behind it)
        if long_prefill_threshold is None:
            long_prefill_threshold = max(max_num_batched_tokens // 4, 1) if enable_chunked_prefill else max_num_batched_tokens
        self.long_prefill_threshold = long_prefill_threshold
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        # the sequences of the last schedule() call, in the batch's order
        self.last_scheduled: list[Sequence] = []

    # ----------------------------------------------------------------- queues

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """Insert a forked sample right after its parent (same arrival)."""
        seq.status = SeqStatus.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.bm.free(seq)
        self._finished_ids.append(f"{seq.request.request_id}:{seq.index}")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.debug("preempted seq %d (%d tokens) to free KV blocks", seq.seq_id, len(seq.token_ids))

    # ---------------------------------------------------------------- schedule

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        copies: list[tuple[int, int]] = []
        preempted = False

        running = self.running
        bm = self.bm
        bs = bm.block_size
        blocks = bm.blocks
        # alone, a prompt may take the whole budget; with company, one chunk is capped
        cap = self.long_prefill_threshold if (len(running) > 1 or self.waiting) else budget
        for seq in tuple(running):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            done = seq.num_computed_tokens
            num_new = len(seq.token_ids) - done
            if num_new == 1:
                # the common decode: when its slot is in a block it holds alone, nothing to grow
                # or copy (BlockManager.writes_own_block, inlined: this runs per sequence per step)
                tbl = seq.block_table
                idx = done // bs
                if idx < len(tbl) and blocks[tbl[idx]].ref_count == 1:
                    scheduled.append((seq, 1))
                    budget -= 1
                    continue
            num_new = min(num_new, budget, cap)
            if num_new <= 0:
                continue
            total = done + num_new
            while bm.blocks_to_grow(seq, total) > bm.num_free_blocks:
                victim = running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            copies += bm.ensure_slots(seq, total)
            scheduled.append((seq, num_new))
            budget -= num_new

        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            n_seqs = seq.params.n if not seq.request.forked else 1
            if len(self.running) + n_seqs > self.max_num_seqs and self.running:
                break
            # prompt logprobs need every prompt position computed; a seeded request computes its whole
            # prompt too, so its text does not depend on what earlier requests left in the cache (a
            # partial hit prefills fewer rows, which changes the kernels' rounding; docs/cpu.md "Seeds")
            skip_cache = seq.params.prompt_logprobs is not None or seq.params.seed is not None
            cached = [] if skip_cache else self.bm.match_prefix(seq.token_ids)
            num_cached = len(cached) * self.bm.block_size
            remaining = len(seq.token_ids) - num_cached
            num_new = min(remaining, budget)
            if self.enable_chunked_prefill and self.running:
                num_new = min(num_new, self.long_prefill_threshold)
            if num_new < remaining and not self.enable_chunked_prefill and scheduled:
                break
            total = num_cached + num_new
            if not self.bm.can_allocate_prompt(total, cached):
                break
            self.waiting.popleft()
            seq.num_cached_tokens = self.bm.allocate_prompt(seq, cached)
            seq.num_computed_tokens = num_cached
            copies += self.bm.ensure_slots(seq, total)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new

        finished, self._finished_ids = self._finished_ids, []
        self.last_scheduled = [seq for seq, _ in scheduled]
        return ScheduledBatch(
            seqs=[self._entry(seq, n) for seq, n in scheduled],
            block_copies=copies,
            finished_keys=finished,
        )

    @staticmethod
    def _entry(seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        end = start + num_new
        ids = seq.token_ids
        sample = end == len(ids)
        request = seq.request
        params = request.params
        n = params.n
        num_samples = n if (n > 1 and sample and not request.forked) else 1
        keys = seq.keys
        if num_samples == 1 and keys is not None:
            key, seeds, rng_keys = keys
        else:
            indices = range(num_samples) if num_samples > 1 else [seq.index]
            # one RNG stream per (request, sample): reproducible whatever else is batched
            seeds = [None if params.seed is None else params.seed + i for i in indices]
            rng_keys = [f"{request.request_id}:{i}" for i in indices]
            key = f"{request.request_id}:{seq.index}"
            if num_samples == 1:
                seq.keys = (key, seeds, rng_keys)  # the same at every step: built once
        want_prompt_logprobs = (params.prompt_logprobs is not None and start < seq.num_prompt_tokens
                                and seq.index == 0 and not request.forked)
        # positional, in ScheduledSeq's field order (keywords cost twice as much; this runs per
        # sequence per step): seq_id, key, token_ids, start_pos, block_table, params, history,
        # num_prompt_tokens, sample, num_samples, seeds, rng_keys, want_prompt_logprobs,
        # blocks_version
        return ScheduledSeq(seq.seq_id, key, ids[start:end], start, seq.block_table, params, ids,
                            seq.num_prompt_tokens, sample, num_samples, seeds, rng_keys,
                            want_prompt_logprobs, seq.blocks_version)
