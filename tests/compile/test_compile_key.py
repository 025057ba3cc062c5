"""The compile-cache key as `llmcore compile` builds it: every input that changes the artifact changes it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from compile_cache import CompileCache

from llmcore.compiled import CompileRequest, build_key, key_differences, plan_compile
from llmcore.errors import ConfigError


def planned(cache, model, **changes):
    request = CompileRequest(device="cpu", batch_size=2, max_seq_len=64, model=str(model), dtype="float32")
    return plan_compile(dataclasses.replace(request, **changes), cache)


@pytest.fixture
def cache(tmp_path):
    return CompileCache(tmp_path / "cache")


def test_same_inputs_same_key_and_every_shape_setting_changes_it(tiny_llama, cache):
    base = planned(cache, tiny_llama).key
    assert planned(cache, tiny_llama).key.digest() == base.digest()
    variants = {
        "dtype": dict(dtype="bfloat16"),
        "batch size": dict(batch_size=4),
        "decode buckets": dict(buckets=(2,)),
        "max_seq_len": dict(max_seq_len=128),
        "prefill buckets": dict(seq_buckets=(16,)),
    }
    digests = {name: planned(cache, tiny_llama, **change).key.digest() for name, change in variants.items()}
    assert base.digest() not in digests.values()
    assert len(set(digests.values())) == len(variants), digests
    shapes = planned(cache, tiny_llama, buckets=(2,), seq_buckets=(16,)).key.static_shapes
    assert shapes == {"batch_sizes": [2], "batch_slots": 2, "max_seq_len": 64, "seq_buckets": [16, 64],
                      "block_size": None}


def test_changing_the_weights_changes_the_key(tiny_llama, cache, tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "edited"
    shutil.copytree(tiny_llama, other)
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    a, b = planned(cache, tiny_llama).key, planned(cache, other).key
    assert a.digest() != b.digest()
    assert [d.split(":")[0] for d in key_differences(a, b)] == ["model_fingerprint"]


def test_plugin_version_compiler_version_graph_code_and_target_change_the_key(tiny_llama, cache, monkeypatch):
    import llmcore_cpu.compiled as compiled
    import llmcore_cpu.plugin as plugin

    base = planned(cache, tiny_llama).key
    changed = {}
    with monkeypatch.context() as m:
        m.setattr(plugin, "__version__", "9.9.9")
        changed["plugin_version"] = planned(cache, tiny_llama).key
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "9.9.9")
        changed["compiler_version"] = planned(cache, tiny_llama).key
    with monkeypatch.context() as m:
        m.setattr(compiled, "graph_source_digest", lambda: "0" * 16)
        changed["compiler_flags.graph_source"] = planned(cache, tiny_llama).key
    with monkeypatch.context() as m:
        m.setattr(compiled, "cpu_target", lambda: "x86_64:avx2")
        changed["target"] = planned(cache, tiny_llama).key
    for field, key in changed.items():
        assert key.digest() != base.digest(), field
        assert [d.split(":")[0] for d in key_differences(key, base)] == [field]


def test_tensor_parallel_quantization_and_block_size_change_the_key(tiny_llama, cache):
    p = planned(cache, tiny_llama)
    inputs = p.device.compile_key_inputs(p.plan)

    def key(plan):
        return build_key(p.key.model_fingerprint, p.plugin, p.probe.plugin_version, inputs, plan)

    assert key(p.plan).digest() == p.key.digest()
    for change in (dict(tensor_parallel=2), dict(quantization="int8"), dict(block_size=16)):
        assert key(dataclasses.replace(p.plan, **change)).digest() != p.key.digest(), change


def test_cpu_plan_refuses_tensor_parallel(tiny_llama, cache):
    # the CPU shards at run time (llmcore.parallel); a compiled CPU artifact is one device
    with pytest.raises(ConfigError, match="cpu shards a model at run time, not in a compiled artifact"):
        planned(cache, tiny_llama, tensor_parallel=2)


def test_another_process_computes_the_same_key(tiny_llama, cache):
    mine = planned(cache, tiny_llama).key.digest()
    cmd = [sys.executable, "-m", "llmcore.compiled.cli", "--device", "cpu", "--model", str(tiny_llama),
           "--batch-size", "2", "--max-seq-len", "64", "--dtype", "float32", "--dry-run", "--json",
           "--cache-dir", str(cache.root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs["key"] == mine and theirs["dry_run"] is True
