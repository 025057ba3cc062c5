"""Boundary objects between the engine, its scheduler and a device's runner.

The one module every layer may import: it imports nothing from llmcore but
:mod:`llmcore.outputs` and :mod:`llmcore.sampling_params` (plain dataclasses),
and no torch. The scheduler fills a :class:`ScheduledBatch`; the runner (the
only code that touches tensors) executes it and returns one
:class:`SampleResult` per entry whose ``sample`` flag is set. Models receive an
:class:`AttentionMetadata` and call an :class:`AttentionBackend`.

Overlapped execution (optional runner capability, see
:class:`llmcore.device.ModelRunner`): a runner with ``launch`` returns a
:class:`StepHandle` at once; the engine schedules the next step before reading
the handle's result, and a scheduled token may be :data:`PLACEHOLDER_TOKEN`,
meaning "the token this sequence samples in the step launched just before",
which the runner takes from its own device-side copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence as Seq

from llmcore.outputs import Logprob
from llmcore.sampling_params import SamplingParams

if TYPE_CHECKING:  # annotations only: this module never imports torch
    import torch

#: Stands for a token not known to the host yet: the one the same sequence sampled in the step
#: launched just before this one (only runners with ``launch`` ever see it).
PLACEHOLDER_TOKEN = -1


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
    # bumped whenever an already-held entry of block_table changes (copy-on-write, free); a
    # runner caching a row of block tables reuses it while (seq_id, blocks_version, length) match
    blocks_version: int = 0

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


class StepHandle(Protocol):
    """A launched step (``runner.launch``): its results, waited for on first call."""

    def result(self) -> list[SampleResult | None]: ...


class DoneStep:
    """A :class:`StepHandle` whose results are already known (synchronous runners)."""

    __slots__ = ("_results",)

    def __init__(self, results: list[SampleResult | None]) -> None:
        self._results = results

    def result(self) -> list[SampleResult | None]:
        return self._results


@dataclass
class AttentionMetadata:
    """Per-step description of where each token's KV goes and what it attends to.

    The KV cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads,
    head_dim]``; a token at position ``p`` lives in slot ``block_table[p // block_size] *
    block_size + p % block_size``.
    """

    slot_mapping: torch.Tensor  # [T] int64
    # per sequence, in batch order
    query_starts: list[int]  # offset of the sequence's first query token in the flat batch
    query_lens: list[int]
    context_lens: list[int]  # tokens in the cache after this step (incl. new ones)
    block_tables: list[list[int]]
    # decode-only fast path (every query_len == 1)
    decode_only: bool = False
    block_table_tensor: torch.Tensor | None = None  # [B, max_blocks] int64
    context_lens_tensor: torch.Tensor | None = None  # [B] int64
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific precomputed data


class AttentionBackend:
    """Writes new K/V into the cache and attends over each sequence's context.

    The model calls ``forward`` once per layer; the torch reference is
    :class:`llmcore.runtime.attention.TorchPagedAttention`.
    """

    name = "abstract"

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        raise NotImplementedError
