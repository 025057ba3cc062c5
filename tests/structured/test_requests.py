"""The constraint object, SamplingParams' checks and the OpenAI/vLLM request fields (no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmcore import ConfigError, RequestError, SamplingParams
from llmcore.structured import StructuredOutput
from llmcore.structured.openai import constraint_from_request


def test_exactly_one_form():
    with pytest.raises(ConfigError, match=r"sets 2 forms \(json, regex\).*Set exactly one of json, json_object"):
        StructuredOutput(json={"type": "object"}, regex="a")
    with pytest.raises(ConfigError, match=r"sets 0 forms \(none\)"):
        StructuredOutput()


def test_forms_are_checked_and_keyed():
    assert StructuredOutput(json='{"type": "integer"}').key == 'json:1:{"type": "integer"}'
    assert StructuredOutput(json={"type": "integer"}, strict=False).key == 'json:0:{"type": "integer"}'
    assert StructuredOutput(choice=("a", "b")).choice == ["a", "b"]
    assert StructuredOutput(json_object=True).form == "json_object"
    with pytest.raises(ConfigError, match=r"structured_output\.json=.*is not valid JSON"):
        StructuredOutput(json="{nope")
    with pytest.raises(ConfigError, match=r"structured_output\.json=.*must be a JSON schema object"):
        StructuredOutput(json=[1, 2])
    with pytest.raises(ConfigError, match=r"structured_output\.choice=.*non-empty list of strings"):
        StructuredOutput(choice="yes")
    with pytest.raises(ConfigError, match=r"structured_output\.choice=\[''\]: holds entries"):
        StructuredOutput(choice=["ok", ""])
    with pytest.raises(ConfigError, match=r"structured_output\.regex=' ': must be a non-empty string"):
        StructuredOutput(regex=" ")


def test_sampling_params_takes_a_dict_and_refuses_what_fights_the_grammar():
    p = SamplingParams(structured_output={"regex": "[0-9]+"})
    assert isinstance(p.structured_output, StructuredOutput) and p.structured_output.regex == "[0-9]+"
    with pytest.raises(ConfigError, match=r"has unknown keys \['schema'\].*Use one of json"):
        SamplingParams(structured_output={"schema": {}})
    with pytest.raises(ConfigError, match=r"must be a StructuredOutput or a dict"):
        SamplingParams(structured_output="json")
    with pytest.raises(ConfigError, match=r"ignore_eos=True: cannot be combined with structured_output"):
        SamplingParams(ignore_eos=True, structured_output={"json_object": True})
    with pytest.raises(ConfigError, match=r"min_tokens=2: cannot be combined with structured_output"):
        SamplingParams(min_tokens=2, structured_output={"json_object": True})


def req(**kw):
    fields = dict(response_format=None, structured_outputs=None, guided_json=None, guided_regex=None,
                  guided_choice=None, guided_grammar=None, guided_decoding_backend=None)
    return SimpleNamespace(**{**fields, **kw})


def test_openai_response_format():
    assert constraint_from_request(req(response_format={"type": "text"})) == (None, {})
    spec, aliases = constraint_from_request(req(response_format={"type": "json_object"}))
    assert spec.form == "json_object" and aliases["structured_output"] == "response_format"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec, aliases = constraint_from_request(req(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}))
    assert spec.json == schema and spec.strict is True
    assert aliases["structured_output.json"] == "response_format.json_schema.schema"
    spec, _ = constraint_from_request(req(response_format={"type": "json_schema", "json_schema": {"schema": schema}}))
    assert spec.strict is False  # OpenAI's default


@pytest.mark.parametrize("fields,option,match", [
    ({"response_format": {"type": "xml"}}, "response_format.type", "is not supported.*'json_schema'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "is missing"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema", "must be a JSON schema object"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex", "conflicts with guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
     "conflicts with response_format"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "not supported"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "sets 2 forms"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "llmcore decodes with xgrammar"),
])
def test_bad_request_fields_name_the_field(fields, option, match):
    with pytest.raises(RequestError, match=match) as e:
        constraint_from_request(req(**fields))
    assert e.value.option == option


def test_vllm_fields():
    spec, aliases = constraint_from_request(req(guided_choice=["a", "b"]))
    assert spec.choice == ["a", "b"] and aliases["structured_output.choice"] == "guided_choice"
    spec, aliases = constraint_from_request(req(structured_outputs={"grammar": 'root ::= "x"'}))
    assert spec.grammar == 'root ::= "x"' and aliases["structured_output.grammar"] == "structured_outputs.grammar"
    spec, _ = constraint_from_request(req(guided_json='{"type": "integer"}', guided_decoding_backend="xgrammar"))
    assert spec.json == '{"type": "integer"}' and spec.text == '{"type": "integer"}'
