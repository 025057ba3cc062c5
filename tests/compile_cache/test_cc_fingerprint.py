"""fingerprint_model: content-based, stable, memoised."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from compile_cache import fingerprint_model
from compile_cache import fingerprint as fpmod


def _hf_folder(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (path / "model-00001-of-00002.safetensors").write_bytes(b"A" * 3000)
    (path / "model-00002-of-00002.safetensors").write_bytes(b"B" * 3000)
    (path / "model.safetensors.index.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return path


def test_hf_folder_stable_and_content_sensitive(tmp_path):
    memo = tmp_path / "memo.json"
    folder = _hf_folder(tmp_path / "m")
    fp = fingerprint_model(folder, memo_file=memo)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint_model(folder, memo_file=memo) == fp
    assert fingerprint_model(folder, memo_file=None) == fp  # memo does not change the value

    # tokenizer changes do not matter for compiled graphs
    (folder / "tokenizer.json").write_text('{"x": 1}')
    assert fingerprint_model(folder, memo_file=memo) == fp

    # same size, different content, mtime forced back: still detected (ctime changes)
    w = folder / "model-00002-of-00002.safetensors"
    st = os.stat(w)
    w.write_bytes(b"C" * 3000)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    fp2 = fingerprint_model(folder, memo_file=memo)
    assert fp2 != fp
    assert fingerprint_model(folder, memo_file=None) == fp2

    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    fp3 = fingerprint_model(folder, memo_file=memo)
    assert fp3 not in (fp, fp2)

    (folder / "model-00002-of-00002.safetensors").rename(folder / "renamed.safetensors")
    assert fingerprint_model(folder, memo_file=memo) != fp3


def test_single_file_is_plain_sha256(tmp_path):
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    assert fingerprint_model(f, memo_file=None) == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    before = fingerprint_model(f, memo_file=tmp_path / "memo.json")
    f.write_bytes(b"GGUF" + bytes(range(256)) * 11)
    assert fingerprint_model(f, memo_file=tmp_path / "memo.json") != before


def test_memo_avoids_rehashing(tmp_path, monkeypatch):
    folder = _hf_folder(tmp_path / "m")
    memo = tmp_path / "memo.json"
    fingerprint_model(folder, memo_file=memo)
    calls = []
    real = fpmod.sha256_file
    monkeypatch.setattr(fpmod, "sha256_file", lambda p: calls.append(p) or real(p))
    fingerprint_model(folder, memo_file=memo)
    assert calls == []
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"Z" * 10)
    fingerprint_model(folder, memo_file=memo)
    assert [p.name for p in calls] == ["model-00001-of-00002.safetensors"]


def test_default_memo_lives_in_cache_dir(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"x")
    fingerprint_model(f)
    assert (tmp_path / "env-cache" / ".fingerprints.json").exists()  # $LLMCORE_CACHE_DIR from conftest


def test_corrupt_memo_is_ignored(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"x")
    memo = tmp_path / "memo.json"
    memo.write_text("{not json")
    assert fingerprint_model(f, memo_file=memo) == "sha256:" + hashlib.sha256(b"x").hexdigest()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        fingerprint_model(tmp_path / "missing", memo_file=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        fingerprint_model(tmp_path / "empty", memo_file=None)
