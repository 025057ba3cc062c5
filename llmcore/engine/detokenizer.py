"""Incremental detokenization in O(new token), on the fast tokenizer's own streaming decoder.

Each sequence owns an :class:`IncrementalDetokenizer`: a ``tokenizers`` ``DecodeStream`` (Rust)
primed with the last prompt tokens, so leading-space and byte-merge rules see the same context
as a full decode. A token that ends inside a multi-byte character yields nothing until the
character completes; :meth:`IncrementalDetokenizer.flush` gives what a full decode shows for
such a tail (U+FFFD) when the sequence ends there. The text equals
``tokenizer.decode(output_ids)`` (tests/test_detokenizer.py). Tokenizers without a Rust backend
fall back to the window technique (:class:`WindowDetokenizer`, also the A/B reference of
benchmarks/host_overhead_bench.py).
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

from tokenizers.decoders import DecodeStream

# prompt tokens the decoder sees as context (enough for any merge or leading-space rule)
CONTEXT_TOKENS = 5


def _context(decode, prompt_ids: Sequence[int], skip: bool) -> list[int]:
    """The last prompt tokens, without a trailing incomplete character.

    Bytes of a character the prompt leaves unfinished would merge with the first output bytes;
    a full decode of the output alone does not see them, so neither does the stream.
    """
    ctx = list(prompt_ids[-CONTEXT_TOKENS:])
    while ctx and decode(ctx, skip).endswith("\ufffd"):
        ctx.pop()
    return ctx


class IncrementalDetokenizer:
    """One sequence's text, a token at a time, through ``tokenizers.decoders.DecodeStream``."""

    __slots__ = ("_rust", "_skip", "_stream", "_context", "_pending")

    def __init__(self, rust: Any, prompt_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._rust = rust
        self._skip = skip_special_tokens
        self._context = _context(lambda ids, sk: rust.decode(ids, skip_special_tokens=sk), prompt_ids,
                                 skip_special_tokens)
        self._stream = DecodeStream(ids=self._context, skip_special_tokens=skip_special_tokens)
        self._context = collections.deque(self._context, maxlen=CONTEXT_TOKENS)  # O(1) per token
        self._pending: list[int] = []  # tokens whose text is held back (incomplete character)

    def step(self, token: int) -> str:
        piece = self._stream.step(self._rust, token)
        if piece is None:
            self._pending.append(token)
            return ""
        if self._pending:
            self._context.extend(self._pending)
            self._pending.clear()
        self._context.append(token)
        return piece

    def flush(self) -> str:
        """Text of the held-back tail as a full decode shows it (U+FFFD for a cut character)."""
        if not self._pending:
            return ""
        context = list(self._context)
        ctx = self._rust.decode(context, skip_special_tokens=self._skip)
        full = self._rust.decode(context + self._pending, skip_special_tokens=self._skip)
        self._pending.clear()
        return full[len(ctx):] if full.startswith(ctx) else full


class WindowDetokenizer:
    """The prefix/offset window technique over ``tokenizer.decode`` (transformers' wrapper).

    Decodes ``ids[prefix:]`` and ``ids[prefix:read]`` each token and emits the difference,
    holding back a trailing U+FFFD. Works with any tokenizer; slower per token than the Rust
    stream (two Python-wrapped decodes).
    """

    __slots__ = ("_tok", "_skip", "_ids", "_prefix", "_read")

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = _context(tokenizer.decode, prompt_ids, skip_special_tokens)
        self._prefix = 0
        self._read = len(self._ids)

    def step(self, token: int) -> str:
        self._ids.append(token)
        prefix = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        if self._read == len(self._ids):
            return ""
        prefix = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return full[len(prefix):]


def make_detokenizer(tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool,
                     streaming: bool = True) -> IncrementalDetokenizer | WindowDetokenizer:
    """The Rust streaming decoder where the tokenizer has one (``streaming``), else the window."""
    rust = getattr(getattr(tokenizer, "hf", None), "backend_tokenizer", None)
    if streaming and rust is not None:
        return IncrementalDetokenizer(rust, prompt_ids, skip_special_tokens)
    return WindowDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
