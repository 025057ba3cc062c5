"""`llmcore compile --device rbln` through the real CLI, on a machine without an RBLN card or compiler."""

from __future__ import annotations

import json

import pytest

from llmcore.testing.configs import LLAMA2_7B, SMOLLM2_135M

pytest.importorskip("llmcore.compiled.cli")


def config_only_model(path, config):
    """A model folder with the real config and an empty safetensors file: enough to plan."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    header = b"{}"
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def run(args, tmp_path, capsys, monkeypatch):
    from llmcore.compiled.cli import main
    from llmcore_rbln import sdk

    monkeypatch.delenv("LLMCORE_RBLN_NPU", raising=False)
    monkeypatch.setattr(sdk, "rbln_devices", lambda dev="/dev": [])
    code = main([*args, "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_llama2_7b_on_four_atom_cards(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "llama2", LLAMA2_7B)
    code, out, err = run(["--device", "rbln", "--model", str(model), "--batch-size", "4", "--max-seq-len", "4096",
                          "--tensor-parallel", "4", "--dry-run"], tmp_path, capsys, monkeypatch)
    assert code == 0, err
    assert "dtype             float16" in out and "tensor parallel   4" in out
    assert "memory per core   5.65 GiB (weights 3.14 + KV 2.00 + 10% overhead)" in out
    assert "note: device 'rbln' cannot compile here: no RBLN device" in out


def test_dry_run_flash_attention_block_size(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "llama2", LLAMA2_7B)
    code, out, err = run(["--device", "rbln", "--model", str(model), "--batch-size", "4", "--max-seq-len", "4096",
                          "--tensor-parallel", "4", "--block-size", "1024", "--dry-run"], tmp_path, capsys,
                         monkeypatch)
    assert code == 0, err
    assert "KV block size     1024" in out


def test_dry_run_smollm2(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "smollm2", SMOLLM2_135M)
    code, out, err = run(["--device", "rbln", "--model", str(model), "--batch-size", "4", "--max-seq-len", "8192",
                          "--dry-run"], tmp_path, capsys, monkeypatch)
    assert code == 0, err
    assert "max sequence len  8192 (prefill buckets [8192])" in out
    assert "memory per core   1.05 GiB" in out


def test_compile_without_the_sdk_prints_the_plan_then_fails_with_the_fix(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "smollm2", SMOLLM2_135M)
    code, out, err = run(["--device", "rbln", "--model", str(model), "--batch-size", "4", "--max-seq-len", "2048"],
                         tmp_path, capsys, monkeypatch)
    assert code != 0
    assert "memory per core" in out
    assert "no RBLN device (/dev/rbln* not found; is the RBLN driver installed and loaded?)" in err
    assert "rebel-compiler" in err and "pip install 'llmcore[rbln]'" in err
