"""Structured output and tool calling through `llmcore serve` (embedded SmolLM2) and the openai client."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.structured.schemas import schemas

pytestmark = pytest.mark.timeout(1800)

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": WEATHER_PARAMS}}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"enum": ["UTC", "CET", "PST"]}},
               "required": ["timezone"], "additionalProperties": False}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smol_server(launch_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("structured")
    srv = launch_server(["--served-model-name", "smol", "--device", "cpu", "--dtype", "float32",
                         "--max-model-len", "2048", "--threads", "1"], d / "server.log")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()[-5000:]


@pytest.fixture(scope="module")
def client(smol_server):
    with openai.OpenAI(base_url=smol_server.base_url, api_key="none", max_retries=0, timeout=600) as c:
        yield c


class City(BaseModel):
    name: str = Field(max_length=16)
    country: Literal["France", "Germany", "Italy", "Spain"]
    population_millions: int = Field(ge=0, le=40)


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model="smol", messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        max_tokens=80, temperature=0)
    msg = r.choices[0].message
    assert isinstance(msg.parsed, City) and r.choices[0].finish_reason == "stop"
    assert City.model_validate_json(msg.content) == msg.parsed


def test_named_tool_choice_returns_arguments_that_validate(client):
    r = client.chat.completions.create(
        model="smol", messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = r.choices[0].message
    assert msg.content is None and r.choices[0].finish_reason == "stop"
    (call,) = msg.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER_PARAMS)
    # the follow-up with the tool's result renders (SmolLM2's template has no tools: the fallback prompt)
    follow = client.chat.completions.create(
        model="smol", max_tokens=12, temperature=0, tools=[WEATHER, TIME],
        messages=[*ASK, msg.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_named_tool_choice_streamed(client):
    stream = client.chat.completions.create(
        model="smol", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, args, ids, finish = None, "", set(), None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        for tc in ch.delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
            name = tc.function.name or name
            args += tc.function.arguments or ""
    assert name == "get_weather" and len(ids) == 1 and finish == "stop"
    jsonschema.validate(json.loads(args), WEATHER_PARAMS)


def test_required_with_one_call(client):
    r = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What time is it in Berlin?"}], tools=[WEATHER, TIME],
        tool_choice="required", parallel_tool_calls=False, max_tokens=80, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments),
                        {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}[call.function.name])


def test_fifty_schemas_streamed_with_n2(smol_server):
    """50 concurrent streaming requests, n=2 sampled: every choice's streamed text validates, and the
    two samples of a request have their own grammar state (they differ)."""
    cases = schemas()

    async def one(c: openai.AsyncOpenAI, i: int, schema: dict) -> dict[int, str]:
        stream = await c.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": f"Write an example JSON {schema.get('type', 'value')}."}],
            max_tokens=160, temperature=0.9, seed=i, n=2, stream=True,
            extra_body={"structured_outputs": {"json": schema}})
        texts = {0: "", 1: ""}
        async for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
                if ch.finish_reason is not None:
                    assert ch.finish_reason == "stop", (texts[ch.index], schema)
        return texts

    async def run():
        async with openai.AsyncOpenAI(base_url=smol_server.base_url, api_key="none", max_retries=0,
                                      timeout=1200) as c:
            return await asyncio.gather(*(one(c, i, s) for i, s in enumerate(cases)))

    differ = 0
    for schema, texts in zip(cases, asyncio.run(run())):
        for text in texts.values():
            jsonschema.validate(json.loads(text), schema)
        differ += texts[0] != texts[1]
    assert differ > 10


@pytest.mark.parametrize("body,param,match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format.json_schema.schema", "Unsupported type"),
    ({"guided_regex": "[a-"}, "guided_regex", "Unclosed"),
    ({"guided_regex": "a{400}", "max_tokens": 2}, "guided_regex", "cannot match anything within max_tokens=2"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs.grammar", "not defined"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "not one of the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}],
      "tool_choice": "required"}, "tools", "Unsupported type"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "conflicts with the requested output format"),
])
def test_bad_input_is_a_400_naming_the_field(smol_server, body, param, match):
    r = httpx.post(f"{smol_server.base_url}/chat/completions", timeout=120,
                   json={"model": "smol", "messages": ASK, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert match in err["message"], err["message"]
