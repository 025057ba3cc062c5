"""Raw HTTP against a real server: malformed JSON, wrong types, out-of-range values, 404/401/503/504,
client disconnects aborting requests."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"},
                      timeout=60) as c:
        yield c


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def wait_idle(http: httpx.Client, model: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = http.get("/health").json()["models"][model]
        if h["in_flight"] == 0 and h["num_running"] == 0 and h["num_waiting"] == 0 and h["kv_blocks_used"] == 0:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"{model} not idle: {h}")
        time.sleep(0.05)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("raw", [b'{"model": "tiny",', b"not json", b'{"model": "tiny" "prompt": 1}', b"\xff\xfe"])
def test_malformed_json_is_400(http, raw):
    e = err(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert e["type"] == "invalid_request_error" and e["code"] == "invalid_json"


def test_body_shape(http):
    assert err(http.post("/v1/completions", content=b""), 400)["code"] == "invalid_request"
    assert err(http.post("/v1/completions", json=[1, 2]), 400)["param"] is None
    # curl -d sends a form content type: still read as JSON
    r = http.post("/v1/completions", content=json.dumps(COMP),
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", {**COMP, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMP, "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {**COMP, "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {**COMP, "stream": "yes"}, "stream"),
    ("/v1/completions", {**COMP, "n": True}, "n"),
    ("/v1/completions", {**COMP, "prompt": 5}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": [True]}, "prompt"),
    ("/v1/completions", {**COMP, "stop": [1, 2]}, "stop"),
    ("/v1/completions", {**COMP, "seed": "x"}, "seed"),
    ("/v1/completions", {**COMP, "model": 3}, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/embeddings", {"model": "tiny", "input": {"a": 1}}, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "encoding_format": "hex"}, "encoding_format"),
])
def test_wrong_types_name_the_parameter(http, route, body, param):
    e = err(http.post(route, json=body), 400)
    assert e["param"] == param, e
    assert e["type"] == "invalid_request_error"


@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", {**COMP, "temperature": 3}, "temperature"),
    ("/v1/completions", {**COMP, "temperature": -0.1}, "temperature"),
    ("/v1/completions", {**COMP, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**COMP, "n": 0}, "n"),
    ("/v1/completions", {**COMP, "n": 1000}, "n"),
    ("/v1/completions", {**COMP, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMP, "max_tokens": -5}, "max_tokens"),
    ("/v1/completions", {**COMP, "max_tokens": 5000}, "max_tokens"),  # beyond the context window
    ("/v1/completions", {**COMP, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMP, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {**COMP, "frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/completions", {**COMP, "seed": 2**64}, "seed"),
    ("/v1/completions", {**COMP, "top_k": -2}, "top_k"),
    ("/v1/completions", {**COMP, "min_tokens": 9}, "min_tokens"),
    ("/v1/completions", {**COMP, "stop": ["x"] * 17}, "stop"),
    ("/v1/completions", {**COMP, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": [10**9]}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": "word " * 400}, "prompt"),
    ("/v1/completions", {**COMP, "best_of": 3}, "best_of"),
    ("/v1/completions", {**COMP, "suffix": "x"}, "suffix"),
    ("/v1/completions", {**COMP, "logit_bias": {"5": 1.0}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 9999}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/embeddings", {"model": "tiny", "input": ""}, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "dimensions": 3}, "dimensions"),
])
def test_out_of_range_values_name_the_parameter(http, route, body, param):
    e = err(http.post(route, json=body), 400)
    assert e["param"] == param, e


def test_missing_and_unknown_fields(http):
    e = err(http.post("/v1/completions", json={"prompt": "x"}), 400)
    assert e["param"] == "model" and e["code"] == "missing_required_parameter"
    e = err(http.post("/v1/chat/completions", json={"model": "tiny"}), 400)
    assert e["param"] == "messages"
    e = err(http.post("/v1/completions", json={**COMP, "temprature": 0.5}), 400)
    assert e["param"] == "temprature" and e["code"] == "unknown_parameter"


def test_unknown_model_is_404(http):
    for route, body in [("/v1/completions", COMP), ("/v1/chat/completions", CHAT),
                        ("/v1/embeddings", {"model": "tiny", "input": "x"})]:
        e = err(http.post(route, json={**body, "model": "gpt-4o"}), 404)
        assert e["param"] == "model" and e["code"] == "model_not_found"
    err(http.get("/v1/models/gpt-4o"), 404)


def test_unknown_route_and_method(http):
    assert err(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert err(http.get("/v1/completions"), 405)["code"] == "method_not_allowed"


def test_openapi_schema_is_served(http):
    schema = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health"} <= set(
        schema["paths"])
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["model"]["enum"] == ["tiny", "tiny2", "tight", "slow"]
    assert "text/html" in http.get("/docs").headers["content-type"]


def test_past_max_queue_is_503_with_retry_after(server):
    """`tight` runs 1 sequence and queues 1: a third concurrent request is refused at once."""

    async def main():
        headers = {"Authorization": f"Bearer {server.api_key}"}
        body = {"model": "tight", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as c:
            async with c.stream("POST", "/v1/completions", json=body) as r1:
                assert r1.status_code == 200
                async with c.stream("POST", "/v1/completions", json=body) as r2:
                    assert r2.status_code == 200
                    t0 = time.monotonic()
                    r3 = await c.post("/v1/completions", json={**body, "stream": False})
                    assert time.monotonic() - t0 < 5  # never hangs
                    assert r3.status_code == 503, r3.text
                    assert r3.headers["retry-after"] == "1"
                    assert r3.json()["error"]["code"] == "server_overloaded"
                    # and the models still accept work after the others leave
            return True

    assert asyncio.run(main())
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}) as c:
        wait_idle(c, "tight")
        assert c.post("/v1/completions", json={"model": "tight", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_request_timeout(http):
    """`slow` has a 0.25 s request timeout: 504 without streaming, an error event with streaming."""
    # 32 sampled sequences x 250 tokens take seconds even on a quiet machine
    body = {"model": "slow", "prompt": "x", "max_tokens": 250, "n": 32, "ignore_eos": True, "temperature": 1.0}
    e = err(http.post("/v1/completions", json=body), 504)
    assert e["code"] == "request_timeout"
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    h = wait_idle(http, "slow")
    assert h["requests_aborted"] >= 2


def test_stream_disconnect_aborts_and_frees_kv(server, http):
    before = http.get("/health").json()["models"]["tiny"]["requests_aborted"]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 250, "n": 32, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break
    h = wait_idle(http, "tiny")
    assert h["requests_aborted"] > before


def test_nonstreaming_disconnect_aborts(server, http):
    before = http.get("/health").json()["models"]["tiny"]["requests_aborted"]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 250, "n": 32, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {server.api_key}"})
    wait_idle(http, "tiny")
    assert http.get("/health").json()["models"]["tiny"]["requests_aborted"] > before


def test_health_needs_no_key(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and set(body["models"]) == {"tiny", "tiny2", "tight", "slow"}
    assert body["models"]["tiny"]["device"] == "cpu" and body["models"]["tiny"]["kv_blocks_total"] > 0
