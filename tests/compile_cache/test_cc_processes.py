"""Cross-process behaviour: one compile for concurrent builders, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from compile_cache import CacheKey, CompileCache
from cc_helpers import WORKER, subprocess_env


def _worker_key() -> CacheKey:
    # Must match cc_worker.py.
    return CacheKey(model_fingerprint="sha256:" + "cd" * 32, plugin="cpu", plugin_version="0.1.0",
                    compiler="torch-inductor", compiler_version="2.13.0", dtype="bfloat16",
                    static_shapes={"batch_sizes": [1], "max_seq_len": 128})


def _spawn(root, marker, sleep, started=None):
    args = [sys.executable, str(WORKER), str(root), str(marker), str(sleep)]
    if started is not None:
        args.append(str(started))
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())


def _wait_for(path, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_two_processes_compile_once(tmp_path):
    root, marker, started = tmp_path / "root", tmp_path / "builds.txt", tmp_path / "started"
    first = _spawn(root, marker, 1.0, started)
    _wait_for(started)                      # first is inside build_fn, holding the lock
    second = _spawn(root, marker, 1.0)
    outs = []
    for p in (first, second):
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert marker.read_text().splitlines() == [str(first.pid)]   # exactly one build
    assert outs[0]["digest"] == outs[1]["digest"] == _worker_key().digest()
    assert outs[0]["path"] == outs[1]["path"]
    assert outs[1]["builder_pid"] == first.pid
    assert any("waiting for another process" in m for m in outs[1]["progress"])
    assert CompileCache(root=root).verify() == [(_worker_key().digest(), "ok", "")]


def test_killed_build_leaves_no_entry(tmp_path):
    root, marker, started = tmp_path / "root", tmp_path / "builds.txt", tmp_path / "started"
    victim = _spawn(root, marker, 60.0, started)
    _wait_for(started)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=10)
    assert victim.returncode == -signal.SIGKILL

    cache = CompileCache(root=root)
    key = _worker_key()
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "part1.bin").exists()
    assert not (root / key.short()).exists()
    assert cache.get(key) is None
    assert [r.status for r in cache.ls()] == ["incomplete"]       # the temp dir, flagged
    assert cache.entries() == []

    assert cache.prune() == leftovers
    assert not leftovers[0].exists()

    builds = []
    entry = cache.get_or_build(key, lambda tmp: builds.append(1) or (tmp / "part1.bin").write_bytes(b"ok") and None)
    assert builds == [1] and entry.files == ["part1.bin"]


def test_rebuild_after_kill_cleans_that_keys_temp_dirs(tmp_path):
    root, marker, started = tmp_path / "root", tmp_path / "builds.txt", tmp_path / "started"
    victim = _spawn(root, marker, 60.0, started)
    _wait_for(started)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=10)
    # The kernel released the dead builder's lock, so this does not wait.
    t0 = time.monotonic()
    CompileCache(root=root).get_or_build(_worker_key(), lambda tmp: (tmp / "a").write_bytes(b"a") and None,
                                         lock_timeout=5)
    assert time.monotonic() - t0 < 5
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_prune_skips_temp_dir_of_running_build(tmp_path):
    root, marker, started = tmp_path / "root", tmp_path / "builds.txt", tmp_path / "started"
    builder = _spawn(root, marker, 1.0, started)
    try:
        _wait_for(started)
        cache = CompileCache(root=root)
        assert cache.prune() == []
        assert [r.summary for r in cache.ls()] == ["build in progress"]
    finally:
        out, err = builder.communicate(timeout=30)
    assert builder.returncode == 0, err
    assert [r.status for r in CompileCache(root=root).ls()] == ["ok"]
