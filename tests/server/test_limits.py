"""Request limits of the server: body size (413 before parsing), chat max_tokens default, null content,
and a busy port found before any model loads."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llmcore.engine.async_engine import AsyncEngine
from llmcore.engine.engine import Engine
from llmcore.server.app import create_app
from llmcore.server.convert import DEFAULT_CHAT_MAX_TOKENS
from llmcore.server.settings import DEFAULT_MAX_BODY_BYTES, ServeConfig

REPO = Path(__file__).resolve().parents[2]
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def client(tiny_model):
    engine = Engine(model=str(tiny_model), device="cpu", dtype="float32", max_model_len=64, num_threads=1,
                    progress=False)
    app = create_app({"m": AsyncEngine(engine)}, shutdown_engines=True, default_max_tokens=7, max_body_bytes=LIMIT)
    with TestClient(app) as c:
        yield c


def _prompt_tokens_seen(client) -> float:
    line = next(l for l in client.get("/metrics").text.splitlines() if l.startswith("llmcore_prompt_tokens_total{"))
    return float(line.split()[-1])


def test_defaults_are_documented_values():
    assert DEFAULT_CHAT_MAX_TOKENS == 512 and DEFAULT_MAX_BODY_BYTES == 2 * 2**20
    cfg = ServeConfig()
    assert (cfg.default_max_tokens, cfg.max_body_bytes) == (512, 2 * 2**20)


def test_body_over_the_limit_is_413_before_parsing(client):
    before = _prompt_tokens_seen(client)
    body = b'{"model": "m", "prompt": "' + b"a " * LIMIT + b'"}'
    r = client.post("/v1/completions", content=body)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and f"limit of {LIMIT} bytes" in err["message"]
    assert "--max-body-bytes" in err["message"]
    # without a Content-Length (chunked), counted as it arrives
    r = client.post("/v1/completions", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert _prompt_tokens_seen(client) == before  # nothing was tokenized


def _chat(client, content: str, **extra):
    return client.post("/v1/chat/completions",
                       json={"model": "m", "messages": [{"role": "user", "content": content}], **extra})


def test_chat_without_max_tokens_uses_the_server_default_capped_by_the_context(client):
    r = _chat(client, "hi", ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
    # a prompt that leaves fewer than 7 of the 64 tokens: the default shrinks to what is left
    for words in range(1, 64):
        probe = _chat(client, " ".join(["hi"] * words), max_tokens=1)
        left = 64 - probe.json()["usage"]["prompt_tokens"]
        if left < 7:
            r = _chat(client, " ".join(["hi"] * words), ignore_eos=True)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == left
            return
    pytest.fail("no prompt left fewer than 7 tokens of the context")


def test_min_tokens_above_the_default_names_it(client):
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                  "min_tokens": 9})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "min_tokens" and "the server's default, 7" in err["message"]


@pytest.mark.parametrize("role", ["user", "system", "developer"])
def test_null_content_is_refused_naming_the_field(client, role):
    msgs = [{"role": "user", "content": "hi"}, {"role": role, "content": None}]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": msgs})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages[1].content" and err["code"] == "invalid_value"
    assert err["type"] == "invalid_request_error" and "got null" in err["message"]


def test_assistant_message_may_have_null_content(client):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
            {"role": "user", "content": "again"}]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 2})
    assert r.status_code == 200


def test_busy_port_is_refused_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a model path that does not exist: had it been loaded first, the error would name it
        out = subprocess.run([sys.executable, "-m", "llmcore.server", "serve", "--port", str(port),
                              "--model", "/nonexistent/model"], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"llmcore serve: error: --port={port}: cannot be used on 127.0.0.1: listening on 127.0.0.1:{port} "
        "failed (Address already in use). Pick another port with --port N, or --port 0 for any free one"]
