"""Fixtures for the server tests: small random models and real `llmcore serve` processes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
SECOND_KEY = "second-key"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from llmcore.testing.models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_model2(tmp_path_factory) -> Path:
    from llmcore.testing.models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", seed=1)


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.base_url = url + "/v1"
        self.log_path = log_path
        self.api_key: str | None = None
        self.second_key: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(args: list[str], log_path: Path, timeout: float = 120.0) -> ServerProcess:
    """Start ``python -m llmcore.server serve ARGS --port 0`` and wait for the URL it prints."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    log_file = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmcore.server", "serve", *args, "--port", "0", "--no-access-log"],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env,
    )
    log_file.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = re.search(r"llmcore serve: .* at (http://\S+)", text)
        if m and "Application startup complete" in text:
            return ServerProcess(proc, m.group(1), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout} s:\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def server(tiny_model, tiny_model2, tmp_path_factory):
    """One server, four engines: tiny (llama), tiny2 (qwen2), tight (1 slot + 1 queued), slow (0.25 s timeout)."""
    import yaml

    d = tmp_path_factory.mktemp("server")
    # one torch thread per process: on a small shared CI machine, more threads contend and crawl
    common = {"dtype": "float32", "device": "cpu", "max_model_len": 256, "num_threads": 1}
    cfg = {
        "api_keys": [API_KEY, "${LLMCORE_TEST_SECOND_KEY}"],
        "request_timeout": 60,
        "models": [
            {"name": "tiny", "model": str(tiny_model), **common},
            {"name": "tiny2", "model": str(tiny_model2), **common},
            {"name": "tight", "model": str(tiny_model), **common, "max_num_seqs": 1, "max_queue": 1},
            {"name": "slow", "model": str(tiny_model), **common, "request_timeout": 0.25},
        ],
    }
    (d / "serve.yaml").write_text(yaml.safe_dump(cfg))
    os.environ["LLMCORE_TEST_SECOND_KEY"] = SECOND_KEY
    srv = start_server(["--config", str(d / "serve.yaml")], d / "server.log")
    srv.api_key, srv.second_key = API_KEY, SECOND_KEY
    yield srv
    code = srv.stop()
    log = srv.log()
    assert "Traceback" not in log, log[-5000:]
    assert code in (0, -signal.SIGTERM), log[-3000:]


@pytest.fixture(scope="session")
def launch_server():
    """``launch_server(args, log_path) -> ServerProcess`` for tests that need their own server."""
    return start_server


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
