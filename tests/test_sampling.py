"""Sampling controls: stop strings and ids, min_tokens, penalties, logprobs, streaming."""

from __future__ import annotations

import math

from llmcore import SamplingParams

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


def test_penalties_change_repetitive_output(tiny_engine):
    prompt = list(range(60, 70))
    base = tiny_engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    pen = tiny_engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                        frequency_penalty=2.0, presence_penalty=2.0,
                                                        repetition_penalty=1.5))[0].outputs[0].token_ids
    assert len(set(pen)) >= len(set(base))
    assert pen != base or len(set(base)) == len(base)


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
    prompt = smol_engine.apply_chat_template([{"role": "user", "content": "Write the word café and an emoji 🎉 three times."}])
    deltas = list(smol_engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0)))
    assert all("\ufffd" not in d.text for d in deltas)
    full = smol_engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0))[0].outputs[0].text
    assert "".join(d.text for d in deltas) == full
