"""`llmcore compile --device neuron` through the real CLI, on a machine without Neuron hardware or SDK."""

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
    from llmcore_neuron import sdk

    monkeypatch.delenv("LLMCORE_NEURON_TARGET", raising=False)
    monkeypatch.setattr(sdk, "neuron_devices", lambda dev="/dev": [])
    monkeypatch.setattr(sdk, "instance_family", lambda: None)
    code = main([*args, "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_llama2_7b_tp2_plan_fits_16_gib_cores(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "llama2", LLAMA2_7B)
    code, out, err = run(["--device", "neuron", "--model", str(model), "--batch-size", "4",
                          "--max-seq-len", "4096", "--tensor-parallel", "2", "--dry-run"], tmp_path, capsys,
                         monkeypatch)
    assert code == 0, err
    assert "device            neuron" in out and "dtype             bfloat16" in out
    assert "tensor parallel   2" in out
    assert "memory per core   11.30 GiB (weights 6.28 + KV 4.00 + 10% overhead) of 16 GiB" in out
    assert "note: device 'neuron' cannot compile here: no Neuron device (/dev/neuron* not found)" in out


def test_dry_run_llama2_7b_tp1_is_refused_for_memory(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "llama2", LLAMA2_7B)
    code, out, err = run(["--device", "neuron", "--model", str(model), "--batch-size", "4",
                          "--max-seq-len", "4096", "--dry-run"], tmp_path, capsys, monkeypatch)
    assert code == 2
    assert "needs ~22.6 GiB per core" in err and "more than neuron's 16 GiB" in err


def test_dry_run_smollm2(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "smollm2", SMOLLM2_135M)
    code, out, err = run(["--device", "neuron", "--model", str(model), "--batch-size", "4",
                          "--max-seq-len", "2048", "--dry-run"], tmp_path, capsys, monkeypatch)
    assert code == 0, err
    assert "max sequence len  2048 (prefill buckets [2048])" in out
    assert "memory per core   0.47 GiB" in out


def test_compile_without_the_sdk_prints_the_plan_then_fails_with_the_fix(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "smollm2", SMOLLM2_135M)
    code, out, err = run(["--device", "neuron", "--model", str(model), "--batch-size", "4",
                          "--max-seq-len", "2048"], tmp_path, capsys, monkeypatch)
    assert code != 0
    assert "memory per core" in out, "the plan is printed before the failure"
    assert "no Neuron device (/dev/neuron* not found)" in err
    assert "pip install 'llmcore[neuron]'" in err and "pip.repos.neuron.amazonaws.com" in err


def test_device_options_reach_the_plan_and_the_recompile_command(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "llama2", LLAMA2_7B)
    code, out, err = run(["--device", "neuron", "--model", str(model), "--batch-size", "1", "--max-seq-len", "4096",
                          "--tensor-parallel", "3", "--neuron-target", "trn2", "--on-device-sampling", "--dry-run",
                          "--json"], tmp_path, capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["recompile_command"].endswith("--tensor-parallel 3 --on-device-sampling --neuron-target trn2")
    assert result["plan"]["memory_limit"] == 24 * 2**30, "planned for trn2's 24 GiB cores"


def test_an_rbln_option_is_refused_for_neuron(tmp_path, capsys, monkeypatch):
    model = config_only_model(tmp_path / "llama2", LLAMA2_7B)
    code, out, err = run(["--device", "neuron", "--model", str(model), "--batch-size", "1", "--max-seq-len", "4096",
                          "--prefill-chunk-size", "256", "--dry-run"], tmp_path, capsys, monkeypatch)
    assert code == 2
    assert "--prefill-chunk-size=256: is a rbln setting, not one for neuron. Drop --prefill-chunk-size" in err
