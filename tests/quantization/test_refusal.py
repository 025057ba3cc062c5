"""Unsupported device/method pairs are refused before any weight loads, naming what would work."""

from __future__ import annotations

import pytest

from llmcore.config import EngineConfig
from llmcore.errors import ConfigError, ModelLoadError
from llmcore.plugins import get_registry
from llmcore.selection import probe_all, validate_against


@pytest.fixture(scope="module")
def reports():
    return probe_all(get_registry())


def refuse(reports, device: str, method: str) -> str:
    probe = next(r.probe for r in reports if r.probe.name == device)
    with pytest.raises(ConfigError) as err:
        validate_against(EngineConfig(quantization=method), probe, reports)
    assert err.value.option == "quantization" and err.value.value == method
    return str(err.value)


def test_awq_on_neuron_names_where_awq_runs_and_what_neuron_offers(reports):
    msg = refuse(reports, "neuron", "awq")
    assert msg.startswith("quantization='awq': is not available on neuron. Available on neuron: none. ")
    assert "awq runs on: cpu, cuda" in msg
    assert "cpu: bnb-int8, bnb-nf4, awq, eetq, int4" in msg or "cpu: awq, eetq, int4" in msg


def test_bnb_on_rbln_names_rbln_methods_and_bnb_devices(reports):
    msg = refuse(reports, "rbln", "bnb-int8")
    assert "is not available on rbln" in msg
    assert "Available on rbln: rbln-w4a16, rbln-w8a16, rbln-w8a8, rbln-fp8" in msg
    assert "bnb-int8 runs on: cpu, cuda" in msg


def test_a_device_plugins_own_method_is_named_on_the_cpu(reports):
    msg = refuse(reports, "cpu", "rbln-w8a16")
    assert "is not available on cpu" in msg and "rbln-w8a16 runs on: rbln" in msg


def test_unknown_method_lists_every_known_one(reports):
    msg = refuse(reports, "cpu", "gptq")
    assert "is not a known quantization method" in msg
    assert "awq, bnb-int8, bnb-nf4, eetq, int4, rbln-fp8" in msg


def test_missing_requirement_says_what_to_install(reports, monkeypatch):
    import dataclasses

    import llmcore.capabilities as reg

    cpu = next(r.probe for r in reports if r.probe.name == "cpu")
    without_bnb = dataclasses.replace(
        cpu, capabilities=dataclasses.replace(
            cpu.capabilities, quantization=tuple(q for q in cpu.capabilities.quantization if not q.startswith("bnb"))))
    monkeypatch.setattr(reg, "_importable", lambda name: name != "bitsandbytes")
    with pytest.raises(ConfigError) as err:
        validate_against(EngineConfig(quantization="bnb-nf4"), without_bnb, reports)
    assert "bnb-nf4 needs bitsandbytes on cpu: pip install bitsandbytes" in str(err.value)


def test_engine_refuses_before_resolving_the_model():
    from llmcore import Engine

    # the model path does not exist: a refusal that came after loading would be a ModelLoadError
    with pytest.raises(ConfigError, match="is not available on cpu"):
        Engine(model="/nonexistent/model", device="cpu", quantization="rbln-w4a16", progress=False)


def test_awq_needs_an_awq_checkpoint_and_no_tensor_is_read(tiny_llama, monkeypatch):
    import llmcore.runtime.runner as runner
    from llmcore import Engine

    def no_reads(*a, **k):
        raise AssertionError("weights were read before the checkpoint was checked")

    monkeypatch.setattr(runner, "iter_safetensors", no_reads)
    with pytest.raises(ConfigError) as err:
        Engine(model=str(tiny_llama), device="cpu", quantization="awq", progress=False, num_kv_blocks=16)
    msg = str(err.value)
    assert "needs an AWQ checkpoint" in msg and "is not quantized" in msg
    assert "llmcore quantize --method awq" in msg and "eetq, int4, bnb-int8, bnb-nf4" in msg


def test_quantize_at_load_refuses_a_prequantized_checkpoint(awq_tiny):
    from llmcore import Engine

    with pytest.raises(ConfigError, match=r"already quantized \(awq\).*quantization='awq'"):
        Engine(model=str(awq_tiny), device="cpu", quantization="eetq", progress=False, num_kv_blocks=16)


def test_awq_checkpoint_without_quantization_says_how_to_load_it(awq_tiny):
    from llmcore import Engine

    with pytest.raises(ModelLoadError, match=r"awq-quantized checkpoint; load it with quantization='awq'"):
        Engine(model=str(awq_tiny), device="cpu", progress=False, num_kv_blocks=16)


def test_unsupported_awq_layout_is_named(awq_tiny, tmp_path):
    import json
    import shutil

    from llmcore import Engine

    bad = tmp_path / "gemv"
    shutil.copytree(awq_tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(version="gemv", bits=3)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        Engine(model=str(bad), device="cpu", quantization="awq", progress=False, num_kv_blocks=16)
    assert "bits=3 (only 4 is supported); version='gemv' (only the GEMM layout is supported)" in str(err.value)
