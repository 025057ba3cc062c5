"""Triton's own clients (tritonclient.grpc.aio, tritonclient.grpc, tritonclient.http) against a real
``llmcore serve --model-repository DIR --grpc-port 0``: streaming, infer, generate, health, metadata."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as aio_grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

PROMPT = "The capital of France is"
GREEDY = json.dumps({"max_tokens": 8, "temperature": 0, "ignore_eos": True})


def text_request(client_mod, model: str, prompt: str, request_id: str, *, stream: bool,
                 sampling: str | None = GREEDY, version: str = "") -> dict:
    """A request as the RBLN tutorial's simple_vllm_client.py builds it (plus sampling_parameters)."""
    text = client_mod.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    flag = client_mod.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream]))
    inputs = [text, flag]
    if sampling is not None:
        params = client_mod.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([sampling.encode()], dtype=np.object_))
        inputs.append(params)
    return {"model_name": model, "model_version": version, "inputs": inputs,
            "outputs": [client_mod.InferRequestedOutput("text_output")], "request_id": request_id}


async def stream_texts(url: str, headers: dict, requests: list[dict]) -> dict[str, list]:
    """Run requests on one ModelStreamInfer call; ``{request id: [text chunks or errors]}``."""
    client = aio_grpcclient.InferenceServerClient(url=url)
    got: dict[str, list] = {r["request_id"]: [] for r in requests}

    async def gen():
        for r in requests:
            yield r

    try:
        async for result, error in client.stream_infer(gen(), headers=headers):
            if error is not None:
                got.setdefault("errors", []).append(error)
                continue
            rid = result.get_response().id
            for chunk in result.as_numpy("text_output"):
                got[rid].append(chunk.decode("utf-8"))
    finally:
        await client.close()
    return got


def http_generate(server, headers, model_path: str, prompt: str = PROMPT, **params) -> dict:
    body = {"text_input": prompt, "parameters": {"max_tokens": 8, "temperature": 0, "ignore_eos": True, **params}}
    r = httpx.post(f"{server.url}/v2/models/{model_path}/generate", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_rbln_style_grpc_client_streams_a_completion(server, headers):
    reqs = [text_request(aio_grpcclient, "tiny", PROMPT, "req-0", stream=True),
            text_request(aio_grpcclient, "tiny", PROMPT, "req-1", stream=False)]
    got = asyncio.run(stream_texts(server.grpc_url, headers, reqs))
    assert "errors" not in got, got.get("errors")
    full = http_generate(server, headers, "tiny", exclude_input_in_output=True)["text_output"]
    # streamed: one response per step, only the new text, never the prompt
    assert len(got["req-0"]) > 1
    assert "".join(got["req-0"]) == full
    # not streamed: one response, the prompt first (the vLLM backend's default)
    assert got["req-1"] == [PROMPT + full]


def test_versions_are_addressable_on_every_protocol(server, headers):
    v1 = http_generate(server, headers, "tiny/versions/1", exclude_input_in_output=True)
    v2 = http_generate(server, headers, "tiny/versions/2", exclude_input_in_output=True)
    latest = http_generate(server, headers, "tiny", exclude_input_in_output=True)
    assert (v1["model_version"], v2["model_version"], latest["model_version"]) == ("1", "2", "2")
    assert v1["text_output"] != v2["text_output"]  # different weights
    assert latest["text_output"] == v2["text_output"]  # the highest version by default
    for model, want in (("tiny:1", v1), ("tiny", v2), ("tiny:2", v2)):
        r = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=120, json={
            "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want["text_output"]
        assert r.json()["model"] == f"tiny:{want['model_version']}"
    listed = httpx.get(f"{server.url}/v1/models", headers=headers).json()["data"]
    assert {"tiny:1", "tiny:2", "other:1"} <= {m["id"] for m in listed}


def test_grpc_health_metadata_config_and_unary_infer(server, headers):
    c = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready("tiny", headers=headers) and c.is_model_ready("tiny", "1", headers=headers)
        assert not c.is_model_ready("tiny", "7", headers=headers) and not c.is_model_ready("nope", headers=headers)
        meta = c.get_server_metadata(headers=headers, as_json=True)
        assert meta["name"] == "llmcore" and "model_repository" in meta["extensions"]
        mm = c.get_model_metadata("tiny", headers=headers, as_json=True)
        assert mm["versions"] == ["1", "2"] and mm["platform"] == "llmcore"
        assert {"name": "text_input", "datatype": "BYTES", "shape": ["1"]} in mm["inputs"]
        cfg = c.get_model_config("tiny", "1", headers=headers, as_json=True)["config"]
        assert cfg["model_transaction_policy"] == {"decoupled": True}
        assert cfg["input"][0] == {"name": "text_input", "data_type": "TYPE_STRING", "dims": ["1"]}
        req = text_request(grpcclient, "tiny", PROMPT, "unary-7", stream=False)
        res = c.infer(req["model_name"], req["inputs"], outputs=req["outputs"], request_id="unary-7",
                      headers=headers)
        full = http_generate(server, headers, "tiny")["text_output"]
        assert res.as_numpy("text_output").tolist() == [full.encode()]
        assert res.get_response().id == "unary-7" and res.get_response().model_version == "2"
    finally:
        c.close()


def test_http_client_infer_binary_and_json(server, headers):
    c = httpclient.InferenceServerClient(url=server.http_url)
    try:
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready("other", headers=headers) and not c.is_model_ready("other", "2", headers=headers)
        assert c.get_model_metadata("other", headers=headers)["versions"] == ["1"]
        text = httpclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))  # binary by default
        excl = httpclient.InferInput("exclude_input_in_output", [1], "BOOL")
        excl.set_data_from_numpy(np.array([True]), binary_data=False)
        flags = httpclient.InferInput("return_num_output_tokens", [1], "BOOL")
        flags.set_data_from_numpy(np.array([True]))
        # (the client adds its own entries to the headers dict it gets: give it a copy)
        res = c.infer("tiny", [text, excl, flags], headers=dict(headers), request_id="h-1",
                      parameters={"max_tokens": 8, "temperature": 0, "ignore_eos": True})
        full = http_generate(server, headers, "tiny", exclude_input_in_output=True)["text_output"]
        assert res.as_numpy("text_output").tolist() == [full.encode()]
        assert res.as_numpy("num_output_tokens").tolist() == [8]
        assert res.get_response()["id"] == "h-1"
        out = httpclient.InferRequestedOutput("text_output", binary_data=False)
        res = c.infer("tiny", [text, excl], outputs=[out], headers=dict(headers), model_version="1",
                      parameters={"max_tokens": 8, "temperature": 0})
        assert res.get_response()["outputs"][0]["data"] == [
            http_generate(server, headers, "tiny/versions/1", exclude_input_in_output=True, ignore_eos=False)[
                "text_output"]]
    finally:
        c.close()


def test_generate_stream_sends_events_that_add_up(server, headers):
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 8, "temperature": 0, "ignore_eos": True}}
    events = []
    with httpx.stream("POST", f"{server.url}/v2/models/tiny/generate_stream", json=body, headers=headers,
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert len(events) > 1 and all(e["model_name"] == "tiny" for e in events)
    full = http_generate(server, headers, "tiny", exclude_input_in_output=True)["text_output"]
    assert "".join(e["text_output"] for e in events) == full


def test_metrics_count_both_protocols(server, headers):
    c = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        req = text_request(grpcclient, "other", PROMPT, "m-1", stream=False)
        c.infer("other", req["inputs"], headers=headers)
    finally:
        c.close()
    text = httpx.get(f"{server.url}/metrics", headers=headers).text
    assert 'llmcore_requests_total{model="other",route="grpc:ModelInfer",status="OK"}' in text
    assert 'llmcore_generation_tokens_total{model="other:1"}' in text
    assert 'route="/v2/models/{model}/generate"' in text
