"""Sampling controls: stop strings and ids, min_tokens, penalties, logprobs, streaming."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList

from llmcore import SamplingParams
from tests.conftest import hf_greedy

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]  # -> "The capital of France is Paris."


def test_stop_string_is_not_leaked(smol_engine):
    out = smol_engine.chat(FRANCE, SamplingParams(max_tokens=20, temperature=0, stop=["France"]))[0].outputs[0]
    assert out.text == "The capital of "
    assert out.finish_reason == "stop" and out.stop_reason == "France"
    out = smol_engine.chat(FRANCE, SamplingParams(max_tokens=20, temperature=0, stop="France",
                                                  include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == "The capital of France"


def test_streamed_text_never_contains_the_stop_string(smol_engine):
    prompt = smol_engine.apply_chat_template(FRANCE)
    pieces = [d.text for d in smol_engine.stream(prompt, SamplingParams(max_tokens=20, temperature=0, stop=["is Paris"]))]
    assert "".join(pieces) == "The capital of France "
    assert all("Paris" not in p for p in pieces)


def test_stream_concatenation_equals_generate(smol_engine):
    prompt = smol_engine.apply_chat_template([{"role": "user", "content": "Name three colors."}])
    p = SamplingParams(max_tokens=30, temperature=0)
    deltas = list(smol_engine.stream(prompt, p))
    full = smol_engine.generate(prompt, p)[0].outputs[0]
    assert "".join(d.text for d in deltas) == full.text
    assert sum((d.token_ids for d in deltas), []) == full.token_ids
    assert deltas[-1].finish_reason == full.finish_reason


def test_stop_token_ids_min_tokens_and_ignore_eos(tiny_engine):
    prompt = list(range(5, 15))
    free = tiny_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_tok = free.token_ids[3]
    first = free.token_ids.index(stop_tok)
    out = tiny_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.stop_reason == stop_tok
    # min_tokens bans the stop token until enough tokens exist
    out = tiny_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_tok],
                                                        min_tokens=first + 2))[0].outputs[0]
    assert len(out.token_ids) >= first + 2
    assert stop_tok not in out.token_ids[: first + 1]
    out = tiny_engine.generate([prompt], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_logprobs_and_prompt_logprobs(tiny_engine):
    prompt = list(range(20, 30))
    out = tiny_engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=3,
                                                        prompt_logprobs=2, ignore_eos=True))[0]
    o = out.outputs[0]
    assert len(o.logprobs) == 4
    for tok, lp in zip(o.token_ids, o.logprobs):
        best = max(lp.values(), key=lambda x: x.logprob)
        assert best.token_id == tok  # greedy picks the top logprob
        assert len(lp) == 3 and all(v.logprob <= 0 for v in lp.values())
    assert math.isclose(o.cumulative_logprob, sum(lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)), rel_tol=1e-5)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for tok, lp in zip(prompt[1:], out.prompt_logprobs[1:]):
        assert tok in lp


class OpenAIPenalties:
    """Presence and frequency penalties as OpenAI defines them, for transformers' ``generate``:
    ``logit[t] -= frequency * count[t] + presence * (count[t] > 0)``, counting generated tokens only."""

    def __init__(self, prompt_len: int, presence: float = 0.0, frequency: float = 0.0) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.bincount(input_ids[0, self.prompt_len:], minlength=scores.shape[-1]).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


REPEATS = list(range(60, 70))  # tiny_llama's greedy continuation repeats 25873, 14265 and 45386
ECHOES = REPEATS + [45386, 14265]  # the same, with two of the repeated tokens already in the prompt


@pytest.mark.parametrize("prompt", [REPEATS, ECHOES], ids=["repeats", "prompt-echoes"])
@pytest.mark.parametrize("penalty", ["repetition_penalty", "presence_penalty", "frequency_penalty"])
def test_each_penalty_matches_its_definition(tiny_engine, tiny_llama, penalty, prompt):
    """One penalty at a time against transformers on the same weights: repetition_penalty as
    transformers applies it (every token of prompt and output, logit / p if positive else * p),
    presence and frequency as OpenAI defines them (generated tokens only)."""
    n = 24
    base = tiny_engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    base = base.outputs[0].token_ids
    assert len(set(base)) < len(base), f"the baseline must repeat a token to test a penalty: {base}"
    value = {"repetition_penalty": 1.3, "presence_penalty": 0.3, "frequency_penalty": 0.3}[penalty]
    got = tiny_engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                                        **{penalty: value}))[0].outputs[0].token_ids
    if penalty == "repetition_penalty":
        want = hf_greedy(tiny_llama, prompt, n, repetition_penalty=value)
    else:
        def openai(kind):
            rule = OpenAIPenalties(len(prompt), **{kind: value})
            return hf_greedy(tiny_llama, prompt, n, logits_processor=LogitsProcessorList([rule]))

        kind = penalty.split("_")[0]
        want = openai(kind)
        # at 0.3 a token's second repeat matters: presence and frequency pick different tokens here
        assert want != openai({"presence": "frequency", "frequency": "presence"}[kind])
    assert got == want
    assert got != base, "the penalty changed nothing: the test would pass without it"


def test_top_k_1_equals_greedy_and_top_p_min_p_run(tiny_engine):
    prompt = list(range(80, 90))
    greedy = tiny_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    k1 = tiny_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=3, ignore_eos=True))[0].outputs[0].token_ids
    assert k1 == greedy
    tight = tiny_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True))[0].outputs[0].token_ids
    assert tight == greedy  # nucleus of one token
    minp = tiny_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, min_p=1.0, seed=3, ignore_eos=True))[0].outputs[0].token_ids
    assert minp == greedy


def test_multibyte_characters_are_never_split(smol_engine):
    """SmolLM2 answers "Café: 🎉🎉..."; each 4-byte 🎉 spans several byte-level tokens, none of which
    decodes to a character alone: the stream holds those bytes back until the character is whole."""
    prompt = smol_engine.apply_chat_template([{"role": "user", "content": "Write the word café and an emoji 🎉 three times."}])
    deltas = list(smol_engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0)))
    full = smol_engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0))[0].outputs[0]
    assert "é" in full.text and "🎉" in full.text, full.text  # multibyte characters were produced
    partial = [t for t in full.token_ids if "\ufffd" in smol_engine.tokenizer.decode([t])]
    assert partial, "no token of the output is part of a character: nothing here tests the split"
    # a held-back piece shows as a delta with tokens and no text, or tokens carried into a later delta
    assert any(d.token_ids and (not d.text or len(d.token_ids) > 1) for d in deltas), "nothing was held back"
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == full.text
