"""Fixtures for the KServe v2 tests: a model repository of small random models and a real
``llmcore serve --model-repository DIR --grpc-port 0`` process on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "kserve-test-key"
# one torch thread and a small KV cache per engine: several engines share a small CI machine
ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "num_threads": 1, "num_kv_blocks": 64}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str        # http://127.0.0.1:PORT
    grpc_url: str   # 127.0.0.1:PORT (tritonclient's form)
    log_path: Path
    repository: Path

    @property
    def http_url(self) -> str:  # tritonclient.http's form
        return self.url.removeprefix("http://")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def write_config(folder: Path, **settings) -> None:
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump(settings))


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    """``tiny`` with versions 1 and 2 (different weights) and ``other`` with version 1."""
    from llmcore.testing.models import make_random_model

    root = tmp_path_factory.mktemp("repository")
    make_random_model(root / "tiny" / "1", arch="llama", seed=0)
    make_random_model(root / "tiny" / "2", arch="llama", seed=1)
    make_random_model(root / "other" / "1", arch="qwen2", seed=2)
    write_config(root / "tiny", **ENGINE, max_num_seqs=4)
    write_config(root / "other", **ENGINE, max_num_seqs=2, unload="drain")
    return root


def start_server(args: list[str], log_path: Path, repository: Path, timeout: float = 180.0) -> Server:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmcore.server", "serve", *args, "--host", "127.0.0.1", "--port", "0",
             "--grpc-port", "0", "--no-access-log"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        http = re.search(r"llmcore serve: .* at (http://\S+)", text)
        grpc = re.search(r"KServe v2 gRPC at (\S+)", text)
        if http and grpc and "Application startup complete" in text:
            return Server(proc, http.group(1), grpc.group(1), log_path, repository)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout} s:\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    srv = start_server(["--model-repository", str(repository), "--api-key", API_KEY],
                       tmp_path_factory.mktemp("kserve") / "server.log", repository)
    yield srv
    code = srv.stop()
    log = srv.log()
    assert "Traceback" not in log, log[-5000:]
    assert code in (0, -signal.SIGTERM), log[-3000:]


@pytest.fixture
def headers() -> dict[str, str]:
    return {"authorization": f"Bearer {API_KEY}"}
