"""Bad requests get the protocol's errors, naming the field: HTTP status + {"error"}, gRPC status codes,
and on ModelStreamInfer an error response while the stream goes on."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as aio_grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from .test_triton_clients import PROMPT, stream_texts, text_request  # noqa: E402


def tensor(name: str, datatype: str, values, shape=None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(values)], "data": values}


GOOD = tensor("text_input", "BYTES", [PROMPT])

# (case, model path, JSON inputs, request parameters, HTTP status, words the message must contain)
HTTP_CASES = [
    ("unknown model", "nope", [GOOD], {}, 404, ["model 'nope'", "not loaded"]),
    ("unknown version", "tiny/versions/9", [GOOD], {}, 404, ["version '9'", "[1, 2]"]),
    ("missing text_input", "tiny", [tensor("stream", "BOOL", [False])], {}, 400, ["text_input: missing"]),
    ("wrong datatype", "tiny", [tensor("text_input", "INT32", [1])], {}, 400,
     ["text_input", "datatype must be BYTES, got INT32"]),
    ("stream as BYTES", "tiny", [GOOD, tensor("stream", "BYTES", ["yes"])], {}, 400, ["stream", "must be BOOL"]),
    ("two prompts", "tiny", [tensor("text_input", "BYTES", [PROMPT, PROMPT])], {}, 400,
     ["text_input", "shape must hold one element", "[2]"]),
    ("shape and data disagree", "tiny", [tensor("text_input", "BYTES", [PROMPT], shape=[3])], {}, 400,
     ["inputs[0] (text_input)", "holds 3 element(s) but 1 were sent"]),
    ("unknown input", "tiny", [GOOD, tensor("prompt", "BYTES", ["x"])], {}, 400, ["unknown input 'prompt'"]),
    ("not JSON", "tiny", [GOOD, tensor("sampling_parameters", "BYTES", ["{max_tokens: 4"])], {}, 400,
     ["sampling_parameters: not valid JSON"]),
    ("unknown key", "tiny", [GOOD, tensor("sampling_parameters", "BYTES", ['{"max_tokenz": 4}'])], {}, 400,
     ["sampling_parameters.max_tokenz", "max_tokens"]),
    ("bad value", "tiny", [GOOD, tensor("sampling_parameters", "BYTES", ['{"max_tokens": 0}'])], {}, 400,
     ["sampling_parameters.max_tokens", "positive integer"]),
    ("not a number", "tiny", [GOOD], {"temperature": "hot"}, 400, ["parameters.temperature", "'hot'"]),
    ("stream on infer", "tiny", [GOOD, tensor("stream", "BOOL", [True])], {}, 400,
     ["stream: true needs a streaming call"]),
]


@pytest.mark.parametrize("case,path,inputs,params,status,words", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_infer_errors(server, headers, case, path, inputs, params, status, words):
    r = httpx.post(f"{server.url}/v2/models/{path}/infer", headers=headers, timeout=60,
                   json={"inputs": inputs, "parameters": params})
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert isinstance(msg, str)
    for w in words:
        assert w in msg


def test_http_body_and_key_errors(server, headers):
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", headers=headers, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/tiny/generate", headers=headers, json={"text_input": 5})
    assert r.status_code == 400 and r.json()["error"] == "text_input: must be a string, got int"
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json={"inputs": [GOOD]})
    assert r.status_code == 401 and "API key" in r.json()["error"]  # the protocol's error shape
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200  # probes need no key
    r = httpx.post(f"{server.url}/v2/models/tiny/generate_stream", headers=headers,
                   json={"text_input": PROMPT, "exclude_input_in_output": False})
    assert r.status_code == 400 and "exclude_input_in_output: false is not allowed when streaming" in r.text


def test_grpc_errors_have_status_codes(server, headers):
    c = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        def infer(model, version="", sampling='{"max_tokens": 2}', hdrs=headers):
            req = text_request(grpcclient, model, PROMPT, "e", stream=False, sampling=sampling)
            return c.infer(model, req["inputs"], model_version=version, headers=hdrs)

        cases = [
            (lambda: infer("nope"), "StatusCode.NOT_FOUND", "model 'nope'"),
            (lambda: infer("tiny", "9"), "StatusCode.NOT_FOUND", "version '9'"),
            (lambda: infer("tiny", sampling="[1, 2]"), "StatusCode.INVALID_ARGUMENT",
             "sampling_parameters: must be a JSON object"),
            (lambda: infer("tiny", hdrs={}), "StatusCode.UNAUTHENTICATED", "missing API key"),
            (lambda: infer("tiny", hdrs={"authorization": "Bearer wrong"}), "StatusCode.UNAUTHENTICATED",
             "incorrect API key"),
            (lambda: c.get_model_metadata("tiny", "3", headers=headers), "StatusCode.NOT_FOUND", "version '3'"),
        ]
        for call, status, words in cases:
            with pytest.raises(InferenceServerException) as ei:
                call()
            assert ei.value.status() == status, ei.value
            assert words in ei.value.message()
        text = c.get_model_metadata("tiny", headers=headers)  # still serving
        assert text.name == "tiny"
    finally:
        c.close()


def test_stream_errors_come_back_on_the_stream(server, headers):
    bad_type = text_request(aio_grpcclient, "tiny", PROMPT, "bad-1", stream=True)
    bad_type["inputs"][1] = aio_grpcclient.InferInput("stream", [1], "INT32")
    bad_type["inputs"][1].set_data_from_numpy(np.array([1], dtype=np.int32))
    reqs = [bad_type,
            text_request(aio_grpcclient, "nope", PROMPT, "bad-2", stream=True),
            text_request(aio_grpcclient, "tiny", PROMPT, "good", stream=True)]
    got = asyncio.run(stream_texts(server.grpc_url, headers, reqs))
    messages = sorted(e.message() for e in got["errors"])
    assert len(messages) == 2
    assert any("inputs[1] (stream): datatype must be BOOL, got INT32" in m for m in messages)
    assert any("model 'nope'" in m for m in messages)
    assert "".join(got["good"])  # the good request on the same call still streamed


def test_grpc_stream_needs_the_key(server):
    req = text_request(aio_grpcclient, "tiny", PROMPT, "k", stream=True)
    with pytest.raises(grpc.aio.AioRpcError) as ei:  # the aio client lets the call's error through
        asyncio.run(stream_texts(server.grpc_url, {}, [req]))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing API key" in ei.value.details()
