"""`llmcore batch`: OpenAI batch files, bad lines reported without stopping, interrupted runs resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcore.server.batch import BatchRunner, read_done

pytestmark = pytest.mark.timeout(150)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(tiny_model):
    from llmcore.engine.engine import Engine

    return Engine(model=str(tiny_model), dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8,
                  progress=False)


def chat_line(cid: str, content: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": content}], **body}})


def comp_line(cid: str, prompt, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "m", "prompt": prompt, **body}})


def records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_batch_with_bad_lines(engine, tmp_path, capsys):
    lines = [
        chat_line("chat-1", "Hello", max_tokens=5, temperature=0),                          # 1
        comp_line("comp-1", ["a", "b"], max_tokens=3, n=2, temperature=0),                  # 2
        '{"custom_id": "broken", "method": "POST", ',                                      # 3 bad JSON
        "",                                                                                 # 4 blank
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),               # 5 no custom_id
        json.dumps({"custom_id": "url", "method": "POST", "url": "/v1/files", "body": {}}),  # 6 bad url
        chat_line("hot", "x", temperature="hot"),                                           # 7 wrong type
        comp_line("long", "x", max_tokens=10_000),                                          # 8 too long
        chat_line("chat-1", "dup", max_tokens=2),                                           # 9 duplicate id
        json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings",
                    "body": {"model": "m", "input": ["x", "y"]}}),                          # 10 embeddings
        chat_line("chat-2", "Bye", max_tokens=4, temperature=0, stop=["\n"]),               # 11
        "[1, 2]",                                                                           # 12 not an object
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    summary = BatchRunner(engine, "m", progress=True).run(inp, out)
    err = capsys.readouterr().err

    recs = records(out)
    by_id = {r["custom_id"]: r for r in recs if r["custom_id"] is not None}
    assert set(by_id) == {"chat-1", "comp-1", "url", "hot", "long", "emb", "chat-2"}
    for cid in ("chat-1", "comp-1", "emb", "chat-2"):
        assert by_id[cid]["response"]["status_code"] == 200 and by_id[cid]["error"] is None
        assert by_id[cid]["id"].startswith("batch_req")
    chat = by_id["chat-1"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 5
    comp = by_id["comp-1"]["response"]["body"]
    assert [c["index"] for c in comp["choices"]] == [0, 1, 2, 3]
    assert len(by_id["emb"]["response"]["body"]["data"]) == 2
    # the API's 400s, naming the parameter
    assert by_id["hot"]["response"]["status_code"] == 400
    assert by_id["hot"]["response"]["body"]["error"]["param"] == "temperature"
    assert by_id["long"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert by_id["url"]["response"] is None and by_id["url"]["error"]["line"] == 6
    # unreadable lines: an error record with the line number, and a message on stderr
    bad = sorted(r["error"]["line"] for r in recs if r["custom_id"] is None)
    assert bad == [3, 5, 9, 12]
    for n in (3, 5, 6, 9, 12):
        assert f"line {n}:" in err
    assert "tok/s" in err  # the progress bar shows throughput
    assert summary.succeeded == 4 and summary.failed == 2 and sorted(summary.bad_lines) == [3, 5, 6, 9, 12]
    # same greedy answer as the engine gives directly
    direct = engine.chat([{"role": "user", "content": "Hello"}],
                         __import__("llmcore").SamplingParams(max_tokens=5, temperature=0))
    assert chat["choices"][0]["message"]["content"] == direct[0].outputs[0].text

    # rerunning skips everything already answered, including bad lines
    n_before = len(recs)
    again = BatchRunner(engine, "m", progress=False).run(inp, out)
    assert len(records(out)) == n_before
    assert again.skipped == 11 and again.succeeded == 0


def test_read_done_drops_a_half_written_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a", "response": {}}\n{"custom_id": "b", "resp')
    ids, lines = read_done(out)
    assert ids == {"a"} and not lines
    assert out.read_text() == '{"custom_id": "a", "response": {}}\n'


def test_interrupted_run_resumes(tiny_model, tmp_path):
    n = 16
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(
        comp_line(f"r{i}", f"request {i}", max_tokens=48, ignore_eos=True, temperature=0) for i in range(n)) + "\n")
    cmd = [sys.executable, "-m", "llmcore.server", "batch", str(inp), str(out), "--model", str(tiny_model),
           "--dtype", "float32", "--device", "cpu", "--max-num-seqs", "2", "--max-in-flight", "2", "--threads", "1", "--no-progress"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # a SIGINT ignored in this process (as something in the full suite leaves it) would be inherited
    # across exec, and the batch would never see the interrupt: the child starts with the default
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while not (out.exists() and len(out.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "batch produced no output"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    first = records(out)
    assert 3 <= len(first) < n
    # simulate a kill in the middle of a write as well
    with open(out, "a") as f:
        f.write('{"id": "batch_req_x", "custom_id": "r15", "resp')

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    recs = records(out)
    ids = [r["custom_id"] for r in recs]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # each exactly once
    assert all(r["response"]["status_code"] == 200 for r in recs)
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 48 for r in recs)
    assert f"{n - len(first)} succeeded" in proc.stderr and f"{len(first)} skipped" in proc.stderr
