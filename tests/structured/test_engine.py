"""Constrained decoding in the engine with the embedded SmolLM2 on the CPU."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import jsonschema
import pytest
import torch
import xgrammar as xgr

from llmcore import RequestError, SamplingParams
from llmcore.capabilities import Capabilities
from llmcore.structured import StructuredOutput
from llmcore.engine.structured import StructuredOutputs
from tests.structured.schemas import schemas

pytestmark = pytest.mark.timeout(1800)  # the 50-schema batches take minutes on a busy 2-core machine
MAX_TOKENS = 160


def prompt(engine, schema: dict) -> str:
    # short on purpose: the grammar carries the schema, and 50 long prompts would crowd the KV cache
    return engine.apply_chat_template([{"role": "user", "content": f"Write an example JSON {schema.get('type', 'value')}."}])


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_fifty_schemas_greedy_in_one_batch(smol_engine):
    cases = schemas()
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured_output={"json": s}) for s in cases]
    outs = smol_engine.generate([prompt(smol_engine, s) for s in cases], params)
    for s, o in zip(cases, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (c.text, s)
        assert_valid(c.text, s)


def test_constrained_and_plain_share_a_batch(smol_engine):
    """An unconstrained request gives the same greedy text alone and next to constrained ones."""
    plain = SamplingParams(max_tokens=12, temperature=0)
    text = "The capital of France is"
    alone = smol_engine.generate(text, plain)[0].outputs[0].text
    schema = schemas()[0]
    mixed = smol_engine.generate(
        [text, prompt(smol_engine, schema), "Pick a colour:"],
        [plain, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured_output={"json": schema}),
         SamplingParams(max_tokens=5, temperature=0, structured_output={"choice": ["red", "green", "blue"]})],
    )
    assert mixed[0].outputs[0].text == alone
    assert_valid(mixed[1].outputs[0].text, schema)
    assert mixed[2].outputs[0].text in ("red", "green", "blue")
    assert mixed[2].outputs[0].finish_reason == "stop"


def test_stream_concatenates_to_a_valid_document(smol_engine):
    schema = schemas()[17]
    deltas = list(smol_engine.stream(prompt(smol_engine, schema),
                                     SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured_output={"json": schema})))
    assert len(deltas) > 3 and deltas[-1].finish_reason == "stop"
    assert_valid("".join(d.text for d in deltas), schema)


@pytest.mark.parametrize("spec,check", [
    (StructuredOutput(regex=r"[0-9]{3}-[A-Z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[A-Z]{2}", t)),
    (StructuredOutput(choice=["positive", "negative", "neutral"]), lambda t: t in ("positive", "negative", "neutral")),
    (StructuredOutput(grammar='root ::= "The answer is " ("yes" | "no") "."'),
     lambda t: t in ("The answer is yes.", "The answer is no.")),
    (StructuredOutput(grammar='start: "x=" NUM ";"\nNUM: /[0-9]{1,3}/'), lambda t: re.fullmatch(r"x=[0-9]{1,3};", t)),
])
def test_regex_choice_and_grammars_end_where_the_grammar_ends(smol_engine, spec, check):
    out = smol_engine.generate("Answer:", SamplingParams(max_tokens=20, temperature=0.7, seed=5, structured_output=spec))
    c = out[0].outputs[0]
    assert check(c.text), c.text
    assert c.finish_reason == "stop"  # the end-of-sequence token came right where the grammar allowed it


def test_json_cut_by_max_tokens_says_length(smol_engine):
    c = smol_engine.generate(prompt(smol_engine, schemas()[20]), SamplingParams(
        max_tokens=3, temperature=0, structured_output={"json": schemas()[20]}))[0].outputs[0]
    assert c.finish_reason == "length" and c.text.startswith("{")


def test_compiled_once_per_schema(smol_engine):
    schema = {"type": "object", "properties": {"once": {"type": "integer"}}, "required": ["once"]}
    comp = smol_engine.structured.compiler
    misses = comp.misses
    smol_engine.generate(["a", "b", "c"], SamplingParams(max_tokens=8, temperature=0, structured_output={"json": schema}))
    assert comp.misses == misses + 1
    smol_engine.generate("z", SamplingParams(max_tokens=1))  # its step hands the finished keys to the runner
    assert len(smol_engine.structured.states) == 0  # every finished sequence's matcher was freed


def test_bad_constraints_are_request_errors_naming_the_field(smol_engine):
    with pytest.raises(RequestError, match=r"structured_output\.json=.*Unsupported type") as e:
        smol_engine.generate("x", SamplingParams(structured_output={"json": {"type": "strnig"}}))
    assert e.value.option == "structured_output.json"
    with pytest.raises(RequestError, match=r"structured_output\.regex=.*Unclosed '\['"):
        smol_engine.generate("x", SamplingParams(structured_output={"regex": "[a-"}))
    with pytest.raises(RequestError, match=r"cannot match anything within max_tokens=4.*Raise max_tokens"):
        smol_engine.generate("x", SamplingParams(max_tokens=4, structured_output={"regex": "a{1000}"}))
    with pytest.raises(RequestError, match=r"structured_output\.grammar=.*Rule \"foo\" is not defined"):
        smol_engine.generate("x", SamplingParams(structured_output={"grammar": "root ::= foo"}))
    assert not smol_engine.has_unfinished_requests()


def test_a_device_without_logits_refuses_clearly(smol_engine):
    probe = SimpleNamespace(name="neuron", capabilities=Capabilities(structured_output=False))
    so = StructuredOutputs(smol_engine.tokenizer, smol_engine.model_config.vocab_size, probe, smol_engine.runner)
    assert not so.supported
    with pytest.raises(RequestError, match=r"device 'neuron' cannot constrain decoding: its capabilities say it "
                                           r"never returns logits.*structured=yes"):
        so.check(SamplingParams(structured_output={"choice": ["a", "b"]}))
    so.check(SamplingParams())  # unconstrained requests are unaffected
    # a runner whose sampler is not llmcore's is refused too, rather than ignoring the constraint
    other = StructuredOutputs(smol_engine.tokenizer, 100, SimpleNamespace(name="x", capabilities=Capabilities()),
                              SimpleNamespace(sampler=object()))
    with pytest.raises(RequestError, match="does not sample with llmcore's Sampler"):
        other.check(SamplingParams(structured_output={"regex": "a"}))


def test_every_document_the_grammar_allows_validates(smol_engine):
    """Random walks through each schema's grammar (any allowed token, no model) end in valid JSON."""
    rng = random.Random(0)
    vocab = smol_engine.model_config.vocab_size
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    shifts = torch.arange(32, dtype=torch.int32)
    eos = set(smol_engine.tokenizer.eos_token_ids)
    for schema in schemas():
        m = xgr.GrammarMatcher(smol_engine.structured.compile(StructuredOutput(json=schema)))
        ids: list[int] = []
        while True:
            m.fill_next_token_bitmask(bitmask)
            allowed = ((bitmask[0].unsqueeze(-1) >> shifts) & 1).flatten()[:vocab].nonzero().flatten().tolist()
            if eos & set(allowed) and (rng.random() < 0.5 or len(allowed) == 1):
                break
            t = rng.choice([a for a in allowed if a not in eos])
            ids.append(t)
            assert m.accept_token(t)
            assert len(ids) < 400, smol_engine.tokenizer.decode(ids)
        assert_valid(smol_engine.tokenizer.decode(ids), schema)
    bounded = xgr.GrammarMatcher(smol_engine.structured.compile(StructuredOutput(json={"type": "string", "maxLength": 5})))
    assert not bounded.accept_string('"a\x03')  # JSON forbids raw control characters in strings


@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "string", "maxLength": 5}])
def test_json_strings_refuse_encoded_surrogates(smol_engine, schema):
    """xgrammar 0.2 takes the UTF-8 encoding of a surrogate (ED BF BA) as a string character; it is
    not UTF-8, decodes to three U+FFFD and broke a maxLength (llmcore/structured/compiler.py)."""
    xgr = pytest.importorskip("xgrammar")
    compiler = smol_engine.structured.compiler
    info = xgr.TokenizerInfo.from_huggingface(compiler.hf_tokenizer, vocab_size=compiler.vocab_size)
    byte_token = {v: i for i, v in enumerate(info.decoded_vocab) if len(v) == 1}
    compiled = smol_engine.structured.compile(StructuredOutput(json=schema))
    for text, ok in ((b'"\xed\xbf\xba', False), (b'"\xed\x9f\xbf', True)):  # U+DFFA; U+D7FF is a character
        m = xgr.GrammarMatcher(compiled)
        assert all(m.accept_token(byte_token[bytes([c])]) for c in text) == ok, text
