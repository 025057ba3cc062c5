"""What the CUDA probe offers for quantization, and how a request is refused (CPU only, no GPU).

The probe is made to believe it sees an H200 (driver present, a CUDA build of torch, NVML
answering); the methods it lists must be the registry's for "cuda" whose requirements are
importable here, as the CPU plugin does for "cpu", never a hard-coded list.
"""

from __future__ import annotations

import pytest

import llmcore.capabilities as capabilities
from llmcore.config import EngineConfig
from llmcore.errors import ConfigError
from llmcore.quantization import available_names


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make ``llmcore_cuda.plugin.llmcore_probe`` see one H200 without touching a GPU."""
    import torch

    import llmcore_cuda.plugin as plugin

    class _Exists:
        def __init__(self, *_):
            pass

        def exists(self) -> bool:
            return True

    monkeypatch.setattr(plugin, "Path", _Exists)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(plugin, "_nvml_gpu", lambda: ("NVIDIA H200", 141 << 30, (9, 0), 1))
    return plugin


def importable_except(monkeypatch, *missing: str) -> None:
    real = capabilities._importable
    monkeypatch.setattr(capabilities, "_importable",
                        lambda name: name not in missing and (name in ("triton", "bitsandbytes") or real(name)))


def probe(plugin):
    p = plugin.llmcore_probe(config={})
    assert p.score > 0, p.reason
    return p


def test_probe_offers_the_registry_methods_for_cuda(fake_gpu, monkeypatch):
    importable_except(monkeypatch)
    caps = probe(fake_gpu).capabilities
    assert caps.quantization == available_names("cuda") == ("bnb-int8", "bnb-nf4", "awq", "eetq", "int4")


def test_probe_drops_methods_whose_requirements_are_missing(fake_gpu, monkeypatch):
    importable_except(monkeypatch, "triton")
    assert probe(fake_gpu).capabilities.quantization == ("bnb-int8", "bnb-nf4")
    importable_except(monkeypatch, "bitsandbytes")
    assert probe(fake_gpu).capabilities.quantization == ("awq", "eetq", "int4")
    importable_except(monkeypatch, "triton", "bitsandbytes")
    assert probe(fake_gpu).capabilities.quantization == ()


def test_unusable_cuda_offers_nothing(monkeypatch):
    """Without a GPU the probe offers no method: a refusal must not say "cuda offers eetq" here."""
    import llmcore_cuda.plugin as plugin

    class _Missing:
        def __init__(self, *_):
            pass

        def exists(self) -> bool:
            return False

    monkeypatch.setattr(plugin, "Path", _Missing)
    p = plugin.llmcore_probe(config={})
    assert p.score == 0 and p.capabilities.quantization == ()


def test_refusal_names_the_missing_requirement_not_the_plugin(fake_gpu, monkeypatch):
    from llmcore.plugins import get_registry
    from llmcore.selection import probe_all, validate_against

    reports = probe_all(get_registry())
    importable_except(monkeypatch, "triton")
    cuda = probe(fake_gpu)
    with pytest.raises(ConfigError) as err:
        validate_against(EngineConfig(quantization="eetq"), cuda, reports)
    msg = str(err.value)
    assert msg.startswith("quantization='eetq': is not available on cuda. Available on cuda: bnb-int8, bnb-nf4. ")
    assert "eetq needs triton on cuda: pip install triton (or 'llmcore[cuda]')" in msg
    assert "does not offer" not in msg
    importable_except(monkeypatch)
    cuda = probe(fake_gpu)
    for method in ("eetq", "int4", "awq", "bnb-int8", "bnb-nf4"):
        assert validate_against(EngineConfig(quantization=method, dtype="bfloat16"), cuda, reports) == "bfloat16"


def test_tensor_parallel_with_quantization_is_refused_on_cuda(fake_gpu, monkeypatch):
    """The CUDA device shards at run time (NCCL) but not quantized layers: refused before any
    process starts or weight loads, naming both options."""
    from llmcore.models.config import ModelConfig
    from llmcore.parallel.executor import TensorParallelRunner
    from llmcore_cuda.device import CudaDevice

    importable_except(monkeypatch)
    cfg = EngineConfig(quantization="int4", tensor_parallel_size=2)
    dev = CudaDevice(probe(fake_gpu), cfg)
    model = ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=100, hidden_size=64,
                        intermediate_size=64, num_layers=1, num_heads=8, num_kv_heads=4, head_dim=8)
    with pytest.raises(ConfigError) as err:
        TensorParallelRunner(dev, model, "/nonexistent", "bfloat16", [2], 128)
    msg = str(err.value)
    assert "tensor_parallel_size=2: cannot be combined with quantization='int4'" in msg
    assert "Use tensor_parallel_size=1 with quantization" in msg
