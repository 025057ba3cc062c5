"""Models load and unload while the server runs: the others keep streaming, an unloaded model
answers 404, drain finishes running requests, abort stops them, a failed load says why."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as aio_grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from .conftest import API_KEY, REPO_ROOT  # noqa: E402
from .test_triton_clients import PROMPT, text_request  # noqa: E402


def repo_cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcore.cli.main", "repo", *args, "--url", server.url,
                           "--api-key", API_KEY], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def index(server, headers) -> dict[tuple[str, str], dict]:
    r = httpx.post(f"{server.url}/v2/repository/index", headers=headers, json={})
    assert r.status_code == 200, r.text
    return {(row["name"], row["version"]): row for row in r.json()}


def generate(server, headers, model: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/generate", headers=headers, timeout=300,
                      json={"text_input": PROMPT, "parameters": {"max_tokens": max_tokens, "temperature": 0,
                                                                "ignore_eos": True}})


def in_flight(server, headers, key: str) -> int:
    models = httpx.get(f"{server.url}/health", headers=headers).json()["models"]
    return models.get(key, {}).get("in_flight", 0)


def test_load_and_unload_while_another_model_streams(server, headers):
    sampling = json.dumps({"max_tokens": 200, "temperature": 0, "ignore_eos": True})
    req = text_request(aio_grpcclient, "tiny", PROMPT, "long", stream=True, sampling=sampling)
    flags = aio_grpcclient.InferInput("return_num_output_tokens", [1], "BOOL")
    flags.set_data_from_numpy(np.array([True]))
    req["inputs"].append(flags)
    req["outputs"].append(aio_grpcclient.InferRequestedOutput("num_output_tokens"))

    async def main() -> tuple[int, list]:
        client = aio_grpcclient.InferenceServerClient(url=server.grpc_url)
        tokens, errors = 0, []
        first = asyncio.Event()

        async def stream() -> None:
            nonlocal tokens

            async def gen():
                yield req

            async for result, error in client.stream_infer(gen(), headers=headers):
                if error is not None:
                    errors.append(error)
                    continue
                tokens += int(result.as_numpy("num_output_tokens").sum())
                first.set()

        task = asyncio.ensure_future(stream())
        await first.wait()  # the stream is running: unload and load the other model beside it
        await client.unload_model("other", headers=headers)
        assert not await client.is_model_ready("other", headers=headers)
        r = await asyncio.to_thread(generate, server, headers, "other")
        assert r.status_code == 404 and "model 'other' is not loaded" in r.json()["error"]
        r = await asyncio.to_thread(httpx.post, f"{server.url}/v1/completions", headers=headers,
                                    json={"model": "other", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404
        row = (await asyncio.to_thread(index, server, headers))[("other", "1")]
        assert (row["state"], row["reason"]) == ("UNAVAILABLE", "unloaded")
        done = await asyncio.to_thread(repo_cli, server, "load", "other")
        assert done.returncode == 0 and "other: loaded" in done.stdout, done.stderr
        assert await client.is_model_ready("other", headers=headers)
        await task
        await client.close()
        return tokens, errors

    tokens, errors = asyncio.run(main())
    assert errors == []
    assert tokens == 200  # every token of the stream arrived, none lost to the load/unload
    assert generate(server, headers, "other").status_code == 200


def test_unload_drains_running_requests(server, headers):
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=generate(server, headers, "other", max_tokens=100)))
    t.start()
    deadline = time.monotonic() + 120
    while in_flight(server, headers, "other:1") == 0 and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.02)
    done = repo_cli(server, "unload", "other")  # drain is the default
    t.join()
    assert done.returncode == 0, done.stderr
    assert result["r"].status_code == 200, result["r"].text  # the running request finished
    assert generate(server, headers, "other").status_code == 404
    assert repo_cli(server, "load", "other").returncode == 0


def test_unload_abort_stops_running_requests(server, headers):
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 200, "temperature": 0, "ignore_eos": True}}
    events = []
    with httpx.stream("POST", f"{server.url}/v2/models/other/generate_stream", json=body, headers=headers,
                      timeout=300) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                break
        done = httpx.post(f"{server.url}/v2/repository/models/other/unload", headers=headers, timeout=300,
                          json={"parameters": {"mode": "abort"}})
        assert done.status_code == 200, done.text
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert "error" in events[-1] and "model 'other:1' stopped" in events[-1]["error"]
    assert sum(len(e.get("text_output", "")) > 0 for e in events) < 200
    assert repo_cli(server, "load", "other").returncode == 0


def test_failed_load_reports_why_and_others_keep_serving(server, headers):
    broken = server.repository / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "config.json").write_text("{not json")
    try:
        r = httpx.post(f"{server.url}/v2/repository/models/broken/load", headers=headers, timeout=300)
        assert r.status_code == 400
        assert "model 'broken' failed to load" in r.json()["error"] and "the other models keep serving" in r.json()["error"]
        row = index(server, headers)[("broken", "")]
        assert row["state"] == "UNAVAILABLE" and row["reason"].startswith("version 1:")
        assert generate(server, headers, "tiny").status_code == 200
        c = grpcclient.InferenceServerClient(url=server.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as ei:
                c.load_model("broken", headers=headers)
            assert ei.value.status() == "StatusCode.INVALID_ARGUMENT" and "failed to load" in ei.value.message()
            rows = c.get_model_repository_index(headers=headers, as_json=True)["models"]
            assert {"name": "broken", "state": "UNAVAILABLE"}.items() <= next(
                r for r in rows if r["name"] == "broken").items()
        finally:
            c.close()
        done = repo_cli(server, "load", "nothere")
        assert done.returncode == 1 and "not in the model repository" in done.stderr
        r = httpx.post(f"{server.url}/v2/repository/models/tiny/load", headers=headers,
                       json={"parameters": {"config": "{}"}})
        assert r.status_code == 400 and r.json()["error"].startswith("parameters.config: a load request cannot")
        (broken / "config.yaml").write_text("devize: cpu\n")
        r = httpx.post(f"{server.url}/v2/repository/models/broken/load", headers=headers, timeout=300)
        assert r.status_code == 400 and "devize" in r.json()["error"]
    finally:
        shutil.rmtree(broken)
    listing = repo_cli(server, "index")
    assert listing.returncode == 0 and "tiny" in listing.stdout and "READY" in listing.stdout
