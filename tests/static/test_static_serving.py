"""Serving a compiled entry with fixed slots: same greedy tokens as the dynamic engine, clear refusals."""

from __future__ import annotations

import pytest

from llmcore import SamplingParams
from llmcore.errors import ConfigError, RequestError

PROMPTS = [
    "Hello there, how are you?",
    "The capital of France is",
    # 30+ tokens: prefill pads to the 64 bucket, the others to 16
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty",
    "a",
    "Write a haiku about the sea.",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def dynamic(compiled_tiny):
    from llmcore import Engine

    return Engine(model=str(compiled_tiny.model), device="cpu", dtype="float32", progress=False,
                  num_kv_blocks=128)


@pytest.fixture(scope="module")
def static(compiled_tiny, isolated_cache_env):
    """Served by key (resolved in LLMCORE_CACHE_DIR); each graph call is counted."""
    from llmcore import Engine

    engine = Engine(compiled=compiled_tiny.key[:16], progress=False)
    engine.graph_calls = calls = {}
    runner = engine.runner
    for kind, table in (("decode", runner.decode_graphs), ("prefill", runner.prefill_graphs)):
        for size, graph in list(table.items()):
            def counted(*args, _g=graph, _name=(kind, size)):
                calls[_name] = calls.get(_name, 0) + 1
                return _g(*args)
            table[size] = counted
    return engine


def tokens(outputs):
    return [[o.token_ids for o in out.outputs] for out in outputs]


def test_static_slots_greedy_equals_the_dynamic_engine(static, dynamic):
    static.graph_calls.clear()
    assert tokens(static.generate(PROMPTS, GREEDY)) == tokens(dynamic.generate(PROMPTS, GREEDY))
    # 5 prompts on 2 slots: both decode buckets and both prefill buckets were used
    assert set(static.graph_calls) == {("decode", 1), ("decode", 2), ("prefill", 16), ("prefill", 64)}
    assert static.stats()["num_preemptions"] == 0


def test_chunked_prefill_reads_earlier_chunks_from_the_slot(compiled_tiny, isolated_cache_env, dynamic):
    from llmcore import Engine

    chunked = Engine(compiled=str(compiled_tiny.path), progress=False, max_num_batched_tokens=8)
    assert tokens(chunked.generate(PROMPTS[2:4], GREEDY)) == tokens(dynamic.generate(PROMPTS[2:4], GREEDY))


def test_seeded_sampling_with_n_2_equals_the_dynamic_engine(static, dynamic):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, n=2)
    assert tokens(static.generate(PROMPTS[:2], params)) == tokens(dynamic.generate(PROMPTS[:2], params))


def test_the_plan_sets_slots_length_and_kv_budget(static, compiled_tiny):
    assert static.scheduler.max_num_seqs == 2
    assert static.max_model_len == 64
    assert static.dtype == "float32"
    assert static.block_manager.num_blocks == 2 * 64 // 16
    assert static.block_manager.enable_prefix_caching is False
    assert static.model_path == compiled_tiny.model


def test_warm_start_loads_the_artifact_and_compiles_nothing(compiled_tiny, isolated_cache_env, monkeypatch):
    import torch

    from llmcore import Engine

    def forbidden(*a, **k):
        raise AssertionError("serving from the cache must not export or compile")

    monkeypatch.setattr(torch.export, "export", forbidden)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", forbidden)
    monkeypatch.setattr(torch, "compile", forbidden)
    engine = Engine(compiled=compiled_tiny.key, progress=False)
    out = engine.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_over_long_prompt_names_the_compiled_length_and_the_recompile_command(static, compiled_tiny):
    prompt = list(range(100, 170))  # 70 tokens
    with pytest.raises(RequestError) as info:
        static.generate(prompt, SamplingParams(max_tokens=16))
    msg = str(info.value)
    assert "is 70 tokens" in msg and "max_seq_len=64" in msg
    assert "Shorten the prompt to at most 63 tokens" in msg
    assert f"recompile: llmcore compile --device cpu --model {compiled_tiny.model} --batch-size 2 " \
           "--max-seq-len 128 --dtype float32 --seq-buckets 16" in msg
    assert not static.has_unfinished_requests()


def test_n_beyond_the_slots_and_prompt_logprobs_are_refused(static):
    with pytest.raises(RequestError, match="needs 3 sequences at once but compiled artifact .* has 2 batch slots"):
        static.generate("hi", SamplingParams(n=3, max_tokens=2))
    with pytest.raises(RequestError, match="prompt_logprobs=1: is not available from a compiled artifact"):
        static.generate("hi", SamplingParams(prompt_logprobs=1, max_tokens=2))


@pytest.mark.parametrize("setting, expected", [
    (dict(max_model_len=128), "max_model_len: requested 128, compiled max_seq_len 64"),
    (dict(max_num_seqs=4), "max_num_seqs: requested 4, compiled batch_size 2"),
    (dict(dtype="bf16"), "dtype: requested 'bfloat16', compiled 'float32'"),
    (dict(device="cuda"), "device: requested 'cuda', compiled 'cpu'"),
    (dict(tensor_parallel_size=2), "tensor_parallel_size: requested 2, compiled tensor_parallel 1"),
])
def test_settings_that_disagree_with_the_artifact_name_both_values_and_the_command(
        compiled_tiny, isolated_cache_env, setting, expected):
    from llmcore import Engine

    with pytest.raises(ConfigError) as info:
        Engine(compiled=compiled_tiny.key[:16], progress=False, **setting)
    msg = str(info.value)
    assert expected in msg
    assert "Drop those options to serve the artifact as compiled, or recompile: llmcore compile" in msg
    option, value = next(iter(setting.items()))
    flag = {"max_model_len": "--max-seq-len", "max_num_seqs": "--batch-size", "dtype": "--dtype",
            "device": "--device", "tensor_parallel_size": "--tensor-parallel"}[option]
    assert f"{flag} {value if option != 'dtype' else 'bfloat16'}" in msg


def test_matching_explicit_settings_are_accepted(compiled_tiny, isolated_cache_env):
    from llmcore import Engine

    engine = Engine(compiled=compiled_tiny.key[:16], progress=False, device="cpu", dtype="fp32",
                    max_model_len=64, max_num_seqs=2, model=str(compiled_tiny.model))
    assert engine.max_model_len == 64


def test_kv_sizing_options_are_fixed_by_the_plan(compiled_tiny, isolated_cache_env):
    from llmcore import Engine

    with pytest.raises(ConfigError, match=r"num_kv_blocks=64: is fixed by compiled artifact .* \(2 slots x 64 tokens\)"):
        Engine(compiled=compiled_tiny.key[:16], progress=False, num_kv_blocks=64)


def test_other_weights_are_refused_naming_both_fingerprints(compiled_tiny, isolated_cache_env, tiny_qwen2):
    from llmcore import Engine

    with pytest.raises(ConfigError) as info:
        Engine(compiled=compiled_tiny.key[:16], progress=False, model=str(tiny_qwen2))
    msg = str(info.value)
    assert "has other weights than compiled artifact" in msg
    assert "fingerprint sha256:" in msg and "artifact: sha256:" in msg
    assert f"compile this model: llmcore compile --device cpu --model {tiny_qwen2}" in msg


def test_an_artifact_from_another_environment_is_refused(compiled_tiny, isolated_cache_env, monkeypatch):
    import llmcore_cpu.compiled as compiled
    from llmcore import Engine

    monkeypatch.setattr(compiled, "cpu_target", lambda: "x86_64:avx2+fma")
    with pytest.raises(ConfigError) as info:
        Engine(compiled=compiled_tiny.key[:16], progress=False)
    msg = str(info.value)
    assert "was compiled for another environment (target: artifact 'x86_64:" in msg
    assert "here 'x86_64:avx2+fma'" in msg
    assert "Recompile it here: llmcore compile --device cpu" in msg


def test_unknown_key_says_how_to_compile(isolated_cache_env):
    from llmcore import Engine

    with pytest.raises(ConfigError, match="no compile cache entry matches 'feedface'.*llmcore compile --device"):
        Engine(compiled="feedface", progress=False)
