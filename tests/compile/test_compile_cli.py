"""`llmcore compile`: plan, compile into the cache, cache hit, corrupt entry rebuilt, devices not here."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from compile_cache import CompileCache

from tests.compile.fixtures import run_cli


def test_first_compile_prints_plan_progress_key_and_path(compiled_tiny):
    out, err = compiled_tiny.out, compiled_tiny.err
    assert "batch slots       2 (decode buckets [1, 2])" in out
    assert "max sequence len  64 (prefill buckets [16, 64])" in out
    assert "dtype             float32" in out
    for graph in ("decode graph, batch 1", "decode graph, batch 2", "prefill graph, tokens 16",
                  "prefill graph, tokens 64"):
        assert graph in err
    assert f"compiled    {compiled_tiny.path}" in out
    assert f"cache key   {compiled_tiny.key}" in out
    entry = CompileCache(compiled_tiny.cache_dir).resolve(compiled_tiny.key)
    assert sorted(entry.files) == ["decode-b1.pt2", "decode-b2.pt2", "graphs.json", "prefill-s16.pt2",
                                   "prefill-s64.pt2"]
    assert entry.metadata["plan"]["seq_buckets"] == [16, 64]
    assert entry.metadata["recompile_command"] == (
        f"llmcore compile --device cpu --model {compiled_tiny.model} --batch-size 2 --max-seq-len 64 "
        "--dtype float32 --seq-buckets 16")


def test_second_identical_compile_is_a_cache_hit_that_compiles_nothing(compiled_tiny, monkeypatch):
    from llmcore_cpu.device import CpuDevice

    def no_compile(*a, **k):
        raise AssertionError("a cache hit must not compile")

    monkeypatch.setattr(CpuDevice, "compile", no_compile)
    t0 = time.perf_counter()
    code, out, err = run_cli(compiled_tiny.args())
    assert code == 0, err
    assert time.perf_counter() - t0 < 30  # planning + hashing a few MB; no compile
    assert f"cache hit   {compiled_tiny.path}" in out
    assert f"cache key   {compiled_tiny.key}" in out


def test_json_output(compiled_tiny):
    code, out, err = run_cli(compiled_tiny.args("--json", "--quiet"))
    result = json.loads(out)
    assert code == 0 and err == ""
    assert result["hit"] is True and result["key"] == compiled_tiny.key
    assert result["path"] == str(compiled_tiny.path) and result["plan"]["batch_buckets"] == [1, 2]


def test_corrupt_entry_is_reported_refused_for_serving_and_rebuilt(compiled_tiny, tmp_path, monkeypatch):
    """The rebuild runs through `llmcore compile`; the compiler itself is replaced by a copy of the
    real graphs so this test does not pay for a second compile (the session fixture compiled them)."""
    from llmcore import Engine
    from llmcore.errors import ConfigError
    from llmcore_cpu.device import CpuDevice

    pristine = tmp_path / "pristine"
    shutil.copytree(compiled_tiny.path, pristine)
    cache_dir = tmp_path / "cache"
    shutil.copytree(compiled_tiny.cache_dir, cache_dir)
    entry_dir = cache_dir / compiled_tiny.key[:16]
    graph = entry_dir / "decode-b2.pt2"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    monkeypatch.setenv("LLMCORE_CACHE_DIR", str(cache_dir))

    with pytest.raises(ConfigError) as info:
        Engine(compiled=compiled_tiny.key[:16], progress=False)
    msg = str(info.value)
    assert "corrupt" in msg and "decode-b2.pt2" in msg
    assert "Rebuild it: llmcore compile --device cpu" in msg

    builds = []

    def copy_graphs(self, model_path, model_config, plan, out_dir, progress=True):
        builds.append(out_dir)
        for f in pristine.iterdir():
            if f.name != "manifest.json":
                shutil.copy(f, Path(out_dir) / f.name)
        return {"graphs": "copied by the test"}

    monkeypatch.setattr(CpuDevice, "compile", copy_graphs)
    code, out, err = run_cli([*compiled_tiny.args()[:-2], "--cache-dir", str(cache_dir)])
    assert code == 0, err
    assert "warning: compile cache entry" in err and "is corrupt" in err
    assert len(builds) == 1 and f"compiled    {entry_dir}" in out
    assert [r.status for r in CompileCache(cache_dir).verify()] == ["ok"]
    code, out, err = run_cli([*compiled_tiny.args()[:-2], "--cache-dir", str(cache_dir)])
    assert "cache hit" in out and len(builds) == 1


def test_neuron_dry_run_prints_the_plan_and_exits_0(tiny_llama, tmp_path):
    args = ["--device", "neuron", "--model", str(tiny_llama), "--batch-size", "4", "--max-seq-len", "512",
            "--cache-dir", str(tmp_path / "cache")]
    code, out, err = run_cli([*args, "--dry-run"])
    assert code == 0, err
    assert "plan for neuron" in out
    assert "device            neuron" in out
    assert "batch slots       4 (decode buckets " in out  # the buckets are the neuron planner's choice
    assert "max sequence len  512 (prefill buckets [512])" in out
    assert "cache key   " in out
    assert "note: device 'neuron' cannot compile here" in out


def test_neuron_without_dry_run_prints_the_plan_then_fails_with_the_probe_reason(tiny_llama, tmp_path):
    from llmcore.plugins import get_registry
    from llmcore.selection import probe_all

    probe = next(r.probe for r in probe_all(get_registry()) if r.probe.name == "neuron")
    if probe.usable:
        pytest.skip("this machine has a usable Neuron device")
    code, out, err = run_cli(["--device", "neuron", "--model", str(tiny_llama), "--batch-size", "4",
                              "--max-seq-len", "512", "--cache-dir", str(tmp_path / "cache")])
    assert code == 3
    assert "device            neuron" in out
    assert f"error: device 'neuron' cannot compile here: {probe.reason}" in err
    assert probe.hint and probe.hint in err
    assert not (tmp_path / "cache").exists() or not any(
        p.is_dir() and not p.name.startswith(".") for p in (tmp_path / "cache").iterdir())


def test_invalid_plan_exits_2_naming_the_option(tiny_llama, tmp_path):
    code, out, err = run_cli(["--device", "cpu", "--model", str(tiny_llama), "--batch-size", "2",
                              "--max-seq-len", "4096", "--dry-run", "--cache-dir", str(tmp_path)])
    assert code == 2
    assert "max_seq_len=4096: exceeds the model's max_position_embeddings (1024)" in err


def test_unknown_device_exits_2_listing_known_ones(tiny_llama, tmp_path):
    code, out, err = run_cli(["--device", "tpu", "--model", str(tiny_llama), "--batch-size", "2",
                              "--max-seq-len", "64", "--dry-run", "--cache-dir", str(tmp_path)])
    assert code == 2
    assert "device='tpu': is not a known device" in err and "cpu" in err
