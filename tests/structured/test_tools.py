"""Tool calling without a model: request checks, forced-call schemas, parsers, streamed deltas."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest

from llmcore import RequestError
from llmcore.server.tool_parsers import HermesParser, Llama3JsonParser, MistralParser, ParsedCall, parser_for
from llmcore.server.tools import ToolCalling

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def chat(tools=None, tool_choice=None, parallel=None):
    return SimpleNamespace(tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel)


def calling(template="{{ tools }}", **kw) -> ToolCalling:
    return ToolCalling.from_request(chat(**kw), template)


def test_no_tools_means_no_tool_calling():
    assert ToolCalling.from_request(chat(), "") is None
    assert ToolCalling.from_request(chat(tools=[], tool_choice="auto"), "") is None
    with pytest.raises(RequestError, match="tool_choice='required': needs tools"):
        ToolCalling.from_request(chat(tool_choice="required"), "")


@pytest.mark.parametrize("tools,choice,option,match", [
    ([{"type": "retrieval"}], None, "tools[0].type", "is not supported"),
    ([{"type": "function", "function": {"name": ""}}], None, "tools[0].function.name", "non-empty string"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools[0].function.parameters",
     "JSON schema object"),
    ([WEATHER, WEATHER], None, "tools", "names a function twice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name",
     "is not one of the tools.*get_weather"),
    ([WEATHER], {"type": "function"}, "tool_choice", "must name a function"),
    ([WEATHER], "sometimes", "tool_choice", "is not supported"),
])
def test_bad_tools_name_the_field(tools, choice, option, match):
    with pytest.raises(RequestError, match=match) as e:
        ToolCalling.from_request(chat(tools=tools, tool_choice=choice), "")
    assert e.value.option == option


def test_named_function_constrains_to_its_parameters():
    tc = calling(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    spec, aliases = tc.constraint()
    assert spec.json == WEATHER["function"]["parameters"] and spec.strict
    assert aliases["structured_output.json"] == "tools[0].function.parameters"
    msg, finish = tc.message('{"city": "Paris"}', "stop")
    assert msg["content"] is None and finish == "stop"
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_required_constrains_to_a_list_of_calls():
    tc = calling(tools=[WEATHER, TIME], tool_choice="required", parallel=False)
    spec, _ = tc.constraint()
    good = [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}]
    jsonschema.validate(good, spec.json)
    for bad in ([], good * 2, [{"name": "get_weather", "arguments": {}}], [{"name": "other", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, spec.json)
    msg, finish = tc.message(json.dumps(good), "stop")
    assert finish == "tool_calls"
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [{"city": "Oslo", "unit": "C"}]


def test_auto_and_none_leave_decoding_free():
    assert calling(tools=[WEATHER]).constraint() == (None, {})
    tc = calling(tools=[WEATHER], tool_choice="none")
    msgs, tools = tc.prompt([{"role": "user", "content": "hi"}])
    assert tools is None and msgs == [{"role": "user", "content": "hi"}]
    assert tc.message("<tool_call>{}</tool_call>", "stop") == (
        {"role": "assistant", "content": "<tool_call>{}</tool_call>"}, "stop")


def test_prompt_for_templates_with_and_without_tools():
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    with_tools = calling(template="{% for t in tools %}{% endfor %}", tools=[WEATHER])
    msgs, tools = with_tools.prompt(history)
    assert tools == [WEATHER]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"} and msgs[1]["content"] == ""
    plain = calling(template="{{ message['content'] }}", tools=[WEATHER])
    msgs, tools = plain.prompt(history)
    assert tools is None and msgs[0]["role"] == "system" and '"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                       '{"city": "Rome"}}\n</tool_call>'}
    assert msgs[3] == history[2]


@pytest.mark.parametrize("parser,text,content,calls", [
    (HermesParser(), 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
                     '<tool_call>{"name": "g", "arguments": {}}</tool_call>', "Let me check.",
     [("f", '{"a": 1}'), ("g", "{}")]),
    (HermesParser(), '<tool_call>{"name": "f", "arguments": {"a": 1}}', None, [("f", '{"a": 1}')]),
    (HermesParser(), "<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
    (HermesParser(), "plain reply", "plain reply", []),
    (Llama3JsonParser(), '<|python_tag|>{"name": "f", "parameters": {"a": "x"}}; {"name": "g", "parameters": {}}',
     None, [("f", '{"a": "x"}'), ("g", "{}")]),
    (Llama3JsonParser(), 'The answer is {"a": 1}', 'The answer is {"a": 1}', []),
    (Llama3JsonParser(), '{"a": 1}', '{"a": 1}', []),
    (MistralParser(), '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": "{}"}]', None,
     [("f", '{"a": 1}'), ("g", "{}")]),
    (MistralParser(), ' [{"name": "f", "arguments": {}}]', None, [("f", "{}")]),
])
def test_parsers(parser, text, content, calls):
    got_content, got_calls = parser.parse(text)
    assert got_content == content
    assert got_calls == [ParsedCall(n, a) for n, a in calls]


def test_parser_from_template_or_name():
    assert parser_for(None, "... <tool_call> ...").name == "hermes"
    assert parser_for(None, "{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert parser_for(None, "<|python_tag|>").name == "llama3_json"
    assert parser_for(None, None).name == "hermes"
    assert parser_for("mistral", "<tool_call>").name == "mistral"
    with pytest.raises(ValueError, match="'nope' is not known; available: hermes, llama3_json, mistral"):
        parser_for("nope", None)


def stream(tc: ToolCalling, pieces: list[str]) -> list[tuple[dict, str | None]]:
    out = []
    for i, p in enumerate(pieces):
        out.append(tc.delta(0, p, "stop" if i == len(pieces) - 1 else None))
    return out


def test_stream_auto_sends_content_then_the_calls():
    tc = calling(tools=[WEATHER])
    out = stream(tc, ["Checking", " now <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}',
                      "</tool_call>"])
    content = "".join(d.get("content", "") for d, _ in out)
    assert content == "Checking now "  # "<tool" was held back, then recognised as a call
    calls = [c for d, _ in out for c in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (0, "get_weather", '{"city": "Oslo"}')]
    assert out[-1][1] == "tool_calls"


def test_stream_auto_releases_held_text_that_was_not_a_call():
    tc = calling(tools=[WEATHER])
    out = stream(tc, ["a <", "b", " <tool"])
    assert "".join(d.get("content", "") for d, _ in out) == "a <b <tool"
    assert out[-1][1] == "stop"


def test_stream_named_function_streams_the_arguments():
    tc = calling(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    out = stream(tc, ['{"city"', ': "Li', 'ma"}'])
    first = out[0][0]["tool_calls"][0]
    assert first["function"]["name"] == "get_weather" and first["id"].startswith("call_")
    args = "".join(c["function"]["arguments"] for d, _ in out for c in d["tool_calls"])
    assert json.loads(args) == {"city": "Lima"}
    assert out[-1][1] == "stop"
