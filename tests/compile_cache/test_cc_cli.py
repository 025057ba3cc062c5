"""`cache ls|verify|prune|rm` through add_cache_parser / run_cache_command."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from compile_cache import CompileCache
from compile_cache.cli import add_cache_parser, parse_duration, run_cache_command
from cc_helpers import make_key, subprocess_env, write_artifacts


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="llmcore")
    sub = parser.add_subparsers(dest="command")
    add_cache_parser(sub)
    args = parser.parse_args(argv)
    assert args.func is run_cache_command
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def populated(tmp_path):
    cache = CompileCache(root=tmp_path / "cli-root")
    good = make_key(dtype="bfloat16")
    bad = make_key(dtype="float16")
    cache.get_or_build(good, write_artifacts, metadata={"model": "tiny-llama"})
    entry = cache.get_or_build(bad, write_artifacts)
    p = entry.file("model.pt2")
    p.write_bytes(p.read_bytes()[:-1] + b"!")  # same size, different hash
    return cache, good, bad


def test_ls_table_and_json(populated, capsys):
    cache, good, bad = populated
    rc, out, _ = run(["cache", "--cache-dir", str(cache.root), "ls"], capsys)
    assert rc == 0
    assert str(cache.root) in out and "DIGEST" in out and "SUMMARY" in out
    assert good.short() in out and bad.short() in out
    assert "tiny-llama cpu/torch-inductor bfloat16 bs=1,4 seq=2048" in out
    assert "KiB" in out and "2 item(s)" in out

    # option after the sub-command works too
    rc, out, _ = run(["cache", "ls", "--json", "--verify", "--cache-dir", str(cache.root)], capsys)
    rows = {r["digest"]: r for r in json.loads(out)}
    assert rc == 0
    assert rows[good.digest()]["status"] == "ok" and rows[bad.digest()]["status"] == "corrupt"
    assert rows[good.digest()]["size_bytes"] > 0 and rows[good.digest()]["path"].endswith(good.short())


def test_ls_empty_does_not_create_dir(tmp_path, capsys):
    root = tmp_path / "nothing-here"
    rc, out, _ = run(["cache", "--cache-dir", str(root), "ls"], capsys)
    assert rc == 0 and "no entries" in out and not root.exists()


def test_verify_exit_codes(populated, capsys):
    cache, good, bad = populated
    rc, out, _ = run(["cache", "--cache-dir", str(cache.root), "verify"], capsys)
    assert rc == 1 and "1 ok, 1 bad" in out and "sha256 mismatch" in out
    rc, out, _ = run(["cache", "--cache-dir", str(cache.root), "verify", good.short()[:6]], capsys)
    assert rc == 0 and "1 ok, 0 bad" in out
    rc, out, _ = run(["cache", "--cache-dir", str(cache.root), "verify", "--json", bad.digest()], capsys)
    assert rc == 1 and json.loads(out)[0]["status"] == "corrupt"
    rc, _, err = run(["cache", "--cache-dir", str(cache.root), "verify", "0000000000000000"], capsys)
    assert rc == 2 and "cache ls" in err


def test_prune_invalid_and_older_than(populated, capsys, tmp_path):
    cache, good, bad = populated
    (cache.root / ".tmp-0123456789abcdef-1-dead").mkdir()
    rc, out, _ = run(["cache", "--cache-dir", str(cache.root), "prune", "--dry-run"], capsys)
    assert rc == 0 and "would remove 2 item(s)" in out and (cache.root / bad.short()).exists()
    rc, out, _ = run(["cache", "--cache-dir", str(cache.root), "prune", "--invalid-only"], capsys)
    assert rc == 0 and "removed 2 item(s)" in out and bad.short() in out
    assert [r.digest for r in cache.verify()] == [good.digest()]
    assert not (cache.root / f"{bad.short()}.lock").exists()  # orphan lock cleaned

    rc, out, _ = run(["cache", "--cache-dir", str(cache.root), "prune", "--older-than", "1h"], capsys)
    assert rc == 0 and "removed 0 item(s)" in out
    old = time.time() - 3 * 86400
    os.utime(cache.root / good.short(), (old, old))
    _backdate_manifest(cache.root / good.short(), old)
    rc, out, _ = run(["cache", "prune", "--cache-dir", str(cache.root), "--older-than", "2d"], capsys)
    assert rc == 0 and "removed 1 item(s)" in out and not (cache.root / good.short()).exists()

    rc, _, err = run(["cache", "--cache-dir", str(cache.root), "prune", "--older-than", "1d", "--invalid-only"], capsys)
    assert rc == 2 and "cannot be combined" in err


def _backdate_manifest(entry_dir, when):
    mp = entry_dir / "manifest.json"
    m = json.loads(mp.read_text())
    m["created_at"] = when
    mp.write_text(json.dumps(m))
    os.utime(entry_dir, (when, when))


def test_hit_refreshes_last_used(tmp_path):
    cache = CompileCache(root=tmp_path / "r")
    k = make_key()
    e = cache.get_or_build(k, write_artifacts)
    old = time.time() - 3 * 86400
    _backdate_manifest(e.path, old)
    assert cache.get(k) is not None       # a hit marks it used
    assert cache.prune(older_than_seconds=86400) == []


def test_rm(populated, capsys):
    cache, good, bad = populated
    rc, out, _ = run(["cache", "--cache-dir", str(cache.root), "rm", good.short()[:12]], capsys)
    assert rc == 0 and f"removed {cache.root / good.short()}" in out
    assert not (cache.root / good.short()).exists()
    rc, _, err = run(["cache", "--cache-dir", str(cache.root), "rm", good.short()], capsys)
    assert rc == 2 and "no compile cache entry" in err and "cache ls" in err
    rc, _, err = run(["cache", "--cache-dir", str(cache.root), "rm", "not-hex"], capsys)
    assert rc == 2 and "not a key digest" in err


def test_no_subcommand_prints_help(tmp_path, capsys):
    rc, out, _ = run(["cache", "--cache-dir", str(tmp_path)], capsys)
    assert rc == 2 and "LLMCORE_CACHE_DIR" in out and "LLMCORE_SHARED_CACHE_DIR" in out


def test_help_mentions_keying_and_location(capsys):
    parser = argparse.ArgumentParser(prog="llmcore")
    add_cache_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["cache", "--help"])
    out = capsys.readouterr().out
    for word in ("fingerprint", "compiler", "static shapes", "XDG_CACHE_HOME", "manifest.json"):
        assert word in out


@pytest.mark.parametrize("text,seconds", [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("45s", 45),
                                          ("90", 90), ("1h30m", 5400), ("2w", 1209600), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "d", "-1d", "7d!"])
def test_parse_duration_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_python_dash_m(populated):
    cache, _good, _bad = populated
    out = subprocess.run([sys.executable, "-m", "compile_cache", "ls", "--json", "--cache-dir", str(cache.root)],
                         capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 2
