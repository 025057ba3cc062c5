"""`llmcore serve --ray`: replicas of the OpenAI server on Ray Serve, and the checks of its options.

The option checks run without Ray. The Ray tests start a small local Ray instance (2 CPUs, no
dashboard): one deploys 2 CPU replicas of a tiny random model from this process and talks to
them with the official openai client; one runs the `llmcore serve --ray` command and stops it
with SIGTERM. Both check that nothing Ray started is left running.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcore.errors import ConfigError
from llmcore.server.cli import add_serve_parser
from llmcore.server.commands import serve_command
from llmcore.server.ray_serve import REPLICA_HEADER
from llmcore.server.ray_settings import (
    RaySettings,
    check_settings,
    default_max_ongoing,
    merge_cli,
    replica_config,
)
from llmcore.server.settings import ModelSpec, ServeConfig, build_serve_config, load_config

REPO = Path(__file__).resolve().parents[2]
HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray[serve] is not installed: pip install 'llmcore[ray]'")
REPLICAS = 2


def _args(*argv: str):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_serve_parser(sub)
    return parser.parse_args(["serve", *argv])


# ------------------------------------------------------------------ option checks (no Ray needed)


@pytest.mark.parametrize("argv, option, words", [
    (["--replicas", "2"], "--replicas=2", "needs --ray"),
    (["--ray-address", "auto"], "--ray-address='auto'", "needs --ray"),
    (["--ray", "--replicas", "0"], "--replicas=0", "must be an integer >= 1"),
    (["--ray", "--replicas", "-1"], "--replicas=-1", "e.g. --replicas 2"),
    (["--ray", "--replicas", "2", "--autoscale-max-replicas", "4"], "--replicas=2",
     "cannot be combined with --autoscale-max-replicas"),
    (["--ray", "--autoscale-min-replicas", "1"], "--autoscale-min-replicas=1", "needs --autoscale-max-replicas"),
    (["--ray", "--autoscale-min-replicas", "3", "--autoscale-max-replicas", "2"], "--autoscale-min-replicas=3",
     "is larger than --autoscale-max-replicas=2"),
    (["--ray", "--autoscale-max-replicas", "0"], "--autoscale-max-replicas=0", "must be an integer >= 1"),
    (["--ray", "--autoscale-max-replicas", "2", "--target-ongoing-requests", "0"],
     "--target-ongoing-requests=0.0", "must be a number > 0"),
    (["--ray", "--autoscale-max-replicas", "2", "--target-ongoing-requests", "64", "--ray-max-ongoing-requests",
      "8"], "--target-ongoing-requests=64.0", "is above --ray-max-ongoing-requests=8"),
    (["--ray", "--ray-num-cpus-per-replica", "0"], "--ray-num-cpus-per-replica=0.0", "must be a number > 0"),
    (["--ray", "--ray-num-gpus-per-replica", "-1"], "--ray-num-gpus-per-replica=-1.0", "must be a number >= 0"),
    (["--ray", "--ray-max-ongoing-requests", "0"], "--ray-max-ongoing-requests=0", "must be an integer >= 1"),
])
def test_cli_refuses_bad_ray_options(argv, option, words, capsys):
    assert serve_command(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmcore serve: error: {option}: "), err
    assert words in err


def test_cuda_model_without_gpus_is_refused_before_ray_starts(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # proves Ray is never reached
    assert serve_command(_args("--ray", "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert "--ray-num-gpus-per-replica=0.0" in err and "Reserve one: --ray-num-gpus-per-replica 1" in err


def test_ray_missing_names_the_install_command(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert serve_command(_args("--ray", "--replicas", "2", "--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert "--ray needs Ray Serve, which is not installed" in err and "pip install 'llmcore[ray]'" in err


def test_busy_port_is_refused_before_ray_starts(capsys, monkeypatch):
    import socket

    monkeypatch.setitem(sys.modules, "ray", None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve_command(_args("--ray", "--device", "cpu", "--port", str(port))) == 2
    err = capsys.readouterr().err
    assert f"--port={port}: cannot be used on 127.0.0.1" in err and "--port 0" in err


def test_importing_the_server_does_not_import_ray():
    # the parsers and settings load no torch and no FastAPI either (every `llmcore` start reads them)
    code = ("import sys, llmcore.server, llmcore.server.cli, llmcore.server.settings, llmcore.server.ray_settings; "
            "print(sorted(m for m in ('ray', 'torch', 'fastapi') if m in sys.modules)); "
            "import llmcore.server.ray_serve; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["[]", "False"]


def test_yaml_ray_block_and_command_line_precedence(tmp_path):
    import yaml

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "a", "model": None, "device": "cpu", "max_num_seqs": 8}],
        "max_queue": 10,
        "ray": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 3, "upscale_delay_s": 5},
                "num_cpus_per_replica": 2, "max_ongoing_requests": 40},
    }))
    cfg = load_config(path)
    assert cfg.ray.autoscaling_config == {"min_replicas": 0, "max_replicas": 3, "upscale_delay_s": 5}
    assert cfg.ray.replicas is None and cfg.ray.threads == 2
    # no Ray flag on the command line: the file's block stands
    assert build_serve_config(_args("--config", str(path))).ray == cfg.ray
    # --replicas replaces the file's autoscaling; other flags override single keys
    s = build_serve_config(_args("--config", str(path), "--replicas", "2",
                                     "--ray-num-cpus-per-replica", "1")).ray
    assert (s.replicas, s.autoscaling_config, s.num_cpus_per_replica, s.max_ongoing_requests) == (2, None, 1, 40)
    # autoscale flags merge into the file's autoscaling_config
    s = build_serve_config(_args("--config", str(path), "--autoscale-max-replicas", "5")).ray
    assert s.autoscaling_config == {"min_replicas": 0, "max_replicas": 5, "upscale_delay_s": 5}
    # errors name the file and the key
    path.write_text(yaml.safe_dump({"models": [{"model": None}], "ray": {"replicas": 0}}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ray.replicas=0: must be an integer >= 1")):
        load_config(path)
    path.write_text(yaml.safe_dump({"models": [{"model": None}], "ray": {"replica": 2}}))
    with pytest.raises(ConfigError, match=r"ray\.replica=2: is not a known key. Use: replicas, autoscaling_config"):
        load_config(path)
    path.write_text(yaml.safe_dump({"models": [{"model": None}], "ray": {"replicas": 2,
                                                                         "autoscaling_config": {"max_replicas": 2}}}))
    with pytest.raises(ConfigError, match=r"ray\.replicas=2: cannot be combined with ray\.autoscaling_config"):
        load_config(path)
    path.write_text(yaml.safe_dump({"models": [{"model": None}], "ray": False}))
    assert load_config(path).ray is None


def test_replica_config_threads_and_max_ongoing():
    cfg = ServeConfig(max_queue=100, models=[
        ModelSpec("a", None, {"device": "cpu"}),
        ModelSpec("b", None, {"device": "cpu", "num_threads": 3, "max_num_seqs": 4}, max_queue=None),
    ])
    s = check_settings(RaySettings(replicas=2, num_cpus_per_replica=2.5))
    r = replica_config(cfg, s)
    assert [m.engine_kwargs.get("num_threads") for m in r.models] == [2, 3]  # --threads wins
    assert "num_threads" not in cfg.models[0].engine_kwargs and r.ray is None  # the original is untouched
    # 16 (health headroom) + a: 64 + 100, b: 4 + 1024 (unbounded queue)
    assert default_max_ongoing(cfg) == 16 + 164 + 1028
    assert "2 replicas x 2.5 CPUs" in s.describe()
    assert merge_cli(None, _args()) is None and merge_cli(None, _args("--ray")).replicas is None


# ------------------------------------------------------------------ on a local Ray instance


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_all_stopped(procs: list, timeout: float = 30.0) -> None:
    """Every process in ``procs`` exits (zombies count as gone); stragglers are killed, then the test fails."""
    import psutil

    deadline = time.monotonic() + timeout
    alive = procs
    while time.monotonic() < deadline:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        time.sleep(0.2)
    names = [f"{p.pid} {p.name()}" for p in alive]
    for p in alive:  # leave nothing behind on the (shared) CI machine
        p.kill()
    pytest.fail(f"still running after shutdown: {names}")


# The Ray tests are part of the default run (marked slow: about 20-25 s each on 2 cores).
@needs_ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_replicas_through_openai_client(tiny_model, monkeypatch):
    import httpx
    import openai
    import ray
    from ray import serve

    from llmcore.server.ray_serve import deploy, serve_status

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    old_term = signal.getsignal(signal.SIGTERM)
    assert not ray.is_initialized()
    # other fixtures' processes (e.g. a session-scoped server) are children of pytest too: only
    # what appears with ray.init is Ray's
    before = {p.pid for p in _descendants(os.getpid())}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             logging_level=logging.WARNING)
    started = [p for p in _descendants(os.getpid()) if p.pid not in before]
    try:
        cfg = ServeConfig(host="127.0.0.1", port=0, request_timeout=60, models=[ModelSpec(
            "tiny", str(tiny_model), {"device": "cpu", "dtype": "float32", "max_model_len": 256})])
        url = deploy(cfg, check_settings(RaySettings(replicas=REPLICAS, num_cpus_per_replica=1)))
        assert serve_status() == {"RUNNING": REPLICAS}  # Ray Serve's status API

        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
            raw = client.completions.with_raw_response.create(model="tiny", prompt="The quick brown fox",
                                                               max_tokens=6, temperature=0)
            r = raw.parse()
            assert r.model == "tiny" and r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
            seen = {raw.headers[REPLICA_HEADER]}

            # a streaming chat completion through Ray Serve's proxy: chunks, then [DONE] (the client ends)
            chunks = list(client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
                stream=True, stream_options={"include_usage": True}))
            assert chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5

            # greedy output is the same whichever replica answers
            texts = set()
            for _ in range(6):
                raw = client.completions.with_raw_response.create(model="tiny", prompt="The quick brown fox",
                                                                   max_tokens=6, temperature=0)
                texts.add(raw.parse().choices[0].text)
                seen.add(raw.headers[REPLICA_HEADER])
            assert texts == {r.choices[0].text}

        # /health through Ray, answered by every replica in turn (Ray picks the replica)
        health = {}
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(40):
                h = http.get("/health")
                assert h.status_code == 200 and h.json()["models"]["tiny"]["device"] == "cpu"
                health[h.headers[REPLICA_HEADER]] = h.json()
                if len(health) == REPLICAS and len(seen) == REPLICAS:
                    break
            seen |= set(health)
            assert len(seen) == REPLICAS, f"only replicas {seen} answered"

            # a client that hangs up mid-stream aborts its request on the replica (KV blocks freed)
            body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True,
                    "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                replica = resp.headers[REPLICA_HEADER]
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
            deadline = time.monotonic() + 20
            while True:
                h = http.get("/health")
                m = h.json()["models"]["tiny"]
                if h.headers[REPLICA_HEADER] == replica and m["requests_aborted"] >= 1:
                    assert m["kv_blocks_used"] == 0 and m["in_flight"] == 0
                    break
                assert time.monotonic() < deadline, "the hung-up stream was not aborted"
                time.sleep(0.1)
    finally:
        serve.shutdown()
        ray.shutdown()
        signal.signal(signal.SIGTERM, old_term)  # ray.init installs its own SIGTERM handler
    assert not ray.is_initialized()
    _assert_all_stopped(started)


@needs_ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cli_ray_serve_stops_on_sigterm(tiny_model, tmp_path):
    import httpx
    import psutil
    import yaml

    cfg = {"models": [{"name": "tiny", "model": str(tiny_model), "device": "cpu", "dtype": "float32",
                       "max_model_len": 256}],
           "ray": {"replicas": 1, "num_cpus_per_replica": 1}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmcore.server", "serve", "--config", str(tmp_path / "serve.yaml"),
             "--port", "0", "--log-level", "warning"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    tree: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            text = log_path.read_text(errors="replace")
            m = re.search(r"llmcore serve: 1 model\(s\) \(tiny\) on Ray Serve \(1 replica x 1 CPU\) at (http://\S+)",
                          text)
            tree.update({p.pid: p for p in _descendants(proc.pid)})
            if m:
                break
            assert proc.poll() is None, f"llmcore serve exited with {proc.returncode}:\n{text[-5000:]}"
            assert time.monotonic() < deadline, f"llmcore serve --ray did not start:\n{text[-5000:]}"
            time.sleep(0.2)
        url = m.group(1)
        h = httpx.get(url + "/health", timeout=30)
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.headers[REPLICA_HEADER]
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
                "model": "tiny", "stream": True, "max_tokens": 3,
                "messages": [{"role": "user", "content": "Hi"}]}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[1])["choices"][0]["delta"]["content"] is not None
        tree.update({p.pid: p for p in _descendants(proc.pid)})
        assert any("raylet" in p.name() for p in tree.values())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text(errors="replace")[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log_path.read_text(errors="replace")
    assert "shutting down Ray Serve and the local Ray instance" in text
    assert "SIGTERM received" not in text  # Ray's own handler would abort without stopping Ray
    _assert_all_stopped(list(tree.values()))
