"""Incremental detokenization (Rust DecodeStream) gives exactly the text of a full decode."""

from __future__ import annotations

import random

import pytest

from llmcore.engine.detokenizer import IncrementalDetokenizer, WindowDetokenizer, make_detokenizer
from llmcore.models.tokenizer import Tokenizer

TEXTS = [
    "Héllo wörld, naïve café — “quotes” and ‘apostrophes’",  # multibyte Latin and punctuation
    "你好世界，こんにちは、안녕하세요",  # CJK: 3-byte characters split over byte tokens
    "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷",  # 4-byte characters, joiners
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",  # special tokens
    "  leading spaces, tabs\tand\nnewlines  ",
]


@pytest.fixture(scope="module")
def tok(smollm_dir):
    return Tokenizer(smollm_dir)


def run(detok, ids) -> str:
    text = "".join(detok.step(t) for t in ids)
    return text + detok.flush()


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tok, text, skip):
    ids = tok.hf.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say something:")
    for d in (make_detokenizer(tok, prompt, skip), WindowDetokenizer(tok, prompt, skip)):
        assert run(d, ids) == tok.decode(ids, skip_special_tokens=skip)
    assert isinstance(make_detokenizer(tok, prompt, skip), IncrementalDetokenizer)


def test_multibyte_character_is_held_back_until_complete(tok):
    ids = tok.hf.encode("你", add_special_tokens=False)
    assert len(ids) > 1  # byte-level pieces of one character
    d = make_detokenizer(tok, tok.encode("x"), True)
    pieces = [d.step(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "你"


def test_cut_character_at_the_end_flushes_as_a_full_decode(tok):
    ids = tok.hf.encode("ab你", add_special_tokens=False)[:-1]  # stops inside the character
    d = make_detokenizer(tok, tok.encode("x"), True)
    assert run(d, ids) == tok.decode(ids) and tok.decode(ids).endswith("\ufffd")


def test_random_token_sequences_byte_fallback(tok):
    rng = random.Random(0)
    vocab = tok.vocab_size
    for _ in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            d = make_detokenizer(tok, [rng.randrange(vocab) for _ in range(7)], skip)
            assert run(d, ids) == tok.decode(ids, skip_special_tokens=skip)
