"""Per-sequence grammar state and the token mask, applied where the logits live.

The sampler owns one :class:`GrammarStates`. Each step it calls :meth:`GrammarStates.apply`
before picking tokens (the constrained rows' logits outside the grammar become -inf, on the
logits' device) and :meth:`GrammarStates.accept` after (each sample's matcher advances by its
token). Unconstrained rows in the same batch are not touched. A matcher is keyed like the
sampler's RNG streams, ``"request_id:sample_index"``, so each of ``n`` samples has its own; it is
freed with the sequence (``release``).

The bitmask is filled on the host (xgrammar's batch call, several threads) before the logits'
values are read, so on an accelerator it overlaps the forward pass still running there.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Callable, Sequence

import torch

from llmcore.structured.compiler import import_xgrammar

log = logging.getLogger("llmcore.structured")


class _Matcher:
    __slots__ = ("m", "consumed", "failed")

    def __init__(self, m: Any, consumed: int = 0) -> None:
        self.m = m
        self.consumed = consumed  # output tokens accepted so far
        self.failed = False  # refused a token: only end-of-sequence is allowed from here


class GrammarStates:
    """The matchers of the constrained sequences a sampler sees.

    ``compile(spec)`` returns the compiled grammar (cached by the engine's
    :class:`~llmcore.structured.compiler.GrammarCompiler`); ``eos_token_ids`` end a sequence
    whose matcher failed.
    """

    def __init__(self, compile: Callable[[Any], Any], vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.compile = compile
        self.vocab_size = vocab_size
        self.eos_token_ids = [t for t in eos_token_ids if 0 <= t < vocab_size]
        self.words = (vocab_size + 31) // 32
        self._matchers: dict[str, _Matcher] = {}
        self._bitmask: torch.Tensor | None = None
        self._batch = None  # xgrammar.BatchGrammarMatcher, made on first use

    def __len__(self) -> int:
        return len(self._matchers)

    def release(self, keys: Sequence[str]) -> None:
        for k in keys:
            self._matchers.pop(k, None)

    # ------------------------------------------------------------------ mask

    def apply(self, logits: torch.Tensor, entries: Sequence[Any]) -> bool:
        """Mask the constrained rows of ``logits`` in place; False if no entry is constrained."""
        rows = [i for i, e in enumerate(entries) if e.params.structured_output is not None]
        if not rows:
            return False
        xgr = import_xgrammar()
        bitmask = self._host_bitmask(len(entries), logits.device)
        live, live_rows = [], []
        for i in rows:
            st = self._state(entries[i])
            if st.failed:
                bitmask[i].zero_()
                for t in self.eos_token_ids:
                    bitmask[i, t // 32] |= _bit(t % 32)
            else:
                live.append(st.m)
                live_rows.append(i)
        if len(live) == 1:
            live[0].fill_next_token_bitmask(bitmask, live_rows[0])
        elif live:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask(live, bitmask, live_rows)
        mask = bitmask[: len(entries)]
        if logits.device.type != "cpu":
            mask = mask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=min(logits.shape[-1], self.words * 32),
                                        indices=rows, backend=_backend(logits.device))
        if logits.shape[-1] > self.vocab_size:  # padding columns beyond the model's vocabulary
            logits[rows, self.vocab_size:] = float("-inf")
        return True

    def _host_bitmask(self, rows: int, device: torch.device) -> torch.Tensor:
        b = self._bitmask
        if b is None or b.shape[0] < rows:
            pin = device.type == "cuda"
            b = torch.full((max(rows, 8), self.words), -1, dtype=torch.int32, pin_memory=pin)
            self._bitmask = b
        return b

    def _state(self, entry: Any) -> _Matcher:
        """The entry's matcher, created on first sight and caught up with the sequence's history."""
        st = self._matchers.get(entry.key)
        if st is None:
            xgr = import_xgrammar()
            st = _Matcher(xgr.GrammarMatcher(self.compile(entry.params.structured_output)))
            self._matchers[entry.key] = st
        # tokens the engine appended that this sampler never accepted (a runner that sampled
        # elsewhere, or a restored sequence): feed them so the mask follows the real output
        history = entry.history
        for t in history[entry.num_prompt_tokens + st.consumed:]:
            self._advance(st, entry.key, t)
        return st

    # --------------------------------------------------------------- advance

    def accept(self, entries: Sequence[Any], results: Sequence[Any]) -> None:
        """Advance each constrained sample's matcher by the token it was given."""
        for e, res in zip(entries, results):
            if e.params.structured_output is None or res is None:
                continue
            base = self._matchers.get(e.key)
            if base is None:
                continue
            keys = list(e.rng_keys) if len(e.rng_keys) == len(res.token_ids) else [e.key]
            # the other samples of an n > 1 prompt start from the prompt's state (fork first)
            forks = {k: _Matcher(base.m.fork(), base.consumed) for k in keys if k != e.key}
            for k, t in zip(keys, res.token_ids):
                st = forks.get(k, base)
                if k != e.key:
                    self._matchers[k] = st
                self._advance(st, k, t)

    def _advance(self, st: _Matcher, key: str, token: int) -> None:
        st.consumed += 1
        if st.failed:
            return
        if not st.m.accept_token(token) and not st.m.is_terminated():
            # cannot happen with the mask applied; if it does, end the sequence cleanly
            log.warning("sequence %s: the grammar refused token %d; ending it", key, token)
            st.failed = True


def _bit(i: int) -> int:
    return -(1 << 31) if i == 31 else 1 << i  # int32: bit 31 is the sign bit


def _backend(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"  # xgrammar's CUDA mask kernel
    return "torch_native"  # plain torch ops, on any device
