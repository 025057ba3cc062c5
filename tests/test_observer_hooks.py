"""The hooks a plugin implements to watch the engine or add models: each reports what its spec says.

Plugins here are objects registered in-process, as a plugin module's functions would be through
its entry point (llmcore/hookspecs.py documents each hook).
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from llmcore import CONTRACT_VERSION, Engine, SamplingParams, hookimpl
from llmcore.errors import ModelLoadError
from llmcore.models.llama import LlamaForCausalLM
from llmcore.models.registry import get_architecture
from llmcore.plugins import get_registry, load_plugins


class Observer:
    LLMCORE_CONTRACT_VERSION = CONTRACT_VERSION

    def __init__(self) -> None:
        self.finished: list[tuple] = []
        self.steps: list[dict] = []

    @hookimpl
    def llmcore_request_finished(self, output, stats):
        self.finished.append((output, dict(stats)))

    @hookimpl
    def llmcore_step_stats(self, stats):
        self.steps.append(dict(stats))


@pytest.fixture
def watched(tiny_llama):
    observer = Observer()
    registry = load_plugins(extra=[("observer", observer)])
    assert not registry.refused, registry.refused
    engine = Engine(model=str(tiny_llama), device="cpu", dtype="float32", progress=False, plugins=registry,
                    num_kv_blocks=64, block_size=16)
    return engine, observer


PROMPTS = [list(range(100, 140)), list(range(200, 209))]  # 40 and 9 tokens


def test_request_finished_reports_each_request_once_with_its_stats(watched):
    engine, observer = watched
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    assert sorted(o.request_id for o, _ in observer.finished) == sorted(o.request_id for o in outs)
    by_id = {o.request_id: (o, s) for o, s in observer.finished}
    for prompt, out in zip(PROMPTS, outs):
        seen, stats = by_id[out.request_id]
        assert seen.finished and seen.outputs[0].token_ids == out.outputs[0].token_ids
        assert seen.outputs[0].finish_reason == "length"
        assert stats["num_prompt_tokens"] == len(prompt)
        assert stats["num_generated_tokens"] == 5
        assert stats["num_cached_tokens"] == 0
        assert stats["arrival_time"] <= stats["first_token_time"] <= stats["finish_time"]
    # the same 40-token prompt again: its two full 16-token blocks come from the prefix cache
    observer.finished.clear()
    again = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    ((seen, stats),) = observer.finished
    assert seen.request_id == again.request_id
    assert stats["num_cached_tokens"] == again.num_cached_tokens == 32
    assert stats["num_generated_tokens"] == 3


def test_request_finished_reports_a_stop(watched):
    engine, observer = watched
    free = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    stop = free.outputs[0].token_ids[2]
    observer.finished.clear()
    out = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop]))[0]
    ((seen, stats),) = observer.finished
    assert seen.outputs[0].finish_reason == "stop" and seen.outputs[0].stop_reason == stop
    stop_at = free.outputs[0].token_ids.index(stop) + 1
    assert stats["num_generated_tokens"] == len(out.outputs[0].token_ids) == stop_at


def test_step_stats_account_for_every_token_and_block(watched):
    engine, observer = watched
    engine.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    steps = observer.steps
    assert steps, "no llmcore_step_stats call"
    keys = {"num_running", "num_waiting", "num_prefill_tokens", "num_decode_tokens", "kv_blocks_used",
            "kv_blocks_total", "step_seconds"}
    assert all(keys <= set(s) for s in steps), steps[0]
    # every prompt token is prefilled once; every token after a request's first is one decode
    assert sum(s["num_prefill_tokens"] for s in steps) == sum(len(p) for p in PROMPTS)
    assert sum(s["num_decode_tokens"] for s in steps) == len(PROMPTS) * (5 - 1)
    assert all(s["kv_blocks_total"] == engine.block_manager.num_blocks == 64 for s in steps)
    # while both run they hold ceil(41/16) + ceil(10/16) blocks at most
    assert max(s["kv_blocks_used"] for s in steps) == 3 + 1
    assert all(s["step_seconds"] > 0 for s in steps)
    # a one-token prompt is prefill, not a decode
    observer.steps.clear()
    engine.generate([[7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert sum(s["num_prefill_tokens"] for s in observer.steps) == 1
    assert sum(s["num_decode_tokens"] for s in observer.steps) == 2
    assert steps[-1]["num_running"] == steps[-1]["num_waiting"] == 0


class RenamedLlama(LlamaForCausalLM):
    """A plugin's architecture: the Llama module under another Hugging Face name."""


class Impostor(LlamaForCausalLM):
    """Claims a built-in name: must be ignored."""


class ArchitecturePlugin:
    LLMCORE_CONTRACT_VERSION = CONTRACT_VERSION

    @hookimpl
    def llmcore_model_architectures(self):
        return {"RenamedLlamaForCausalLM": RenamedLlama, "LlamaForCausalLM": Impostor}


@pytest.fixture
def architectures_plugin():
    """Registered in the process-wide registry (the one model loading asks), removed afterwards."""
    registry = get_registry()
    assert registry.register(ArchitecturePlugin(), "test-architectures"), registry.refused
    yield registry
    registry.pm.unregister(name="test-architectures")


def test_model_architectures_adds_a_model_and_never_overrides_a_builtin(architectures_plugin, tiny_llama,
                                                                        tiny_engine, tmp_path, caplog):
    folder = tmp_path / "renamed"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["RenamedLlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="llmcore.models"):
        assert get_architecture("LlamaForCausalLM") is LlamaForCausalLM
    assert "LlamaForCausalLM from a plugin ignored" in caplog.text
    engine = Engine(model=str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=64)
    assert type(engine.runner.model) is RenamedLlama
    # same weights, same module code: the same tokens as the built-in
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = list(range(30, 45))
    assert (engine.generate([prompt], params)[0].outputs[0].token_ids
            == tiny_engine.generate([prompt], params)[0].outputs[0].token_ids)
    with pytest.raises(ModelLoadError, match="RenamedLlamaForCausalLM"):  # listed among the supported
        get_architecture("NoSuchForCausalLM")


def test_request_finished_reports_an_abort(watched):
    engine, observer = watched
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), request_id="gone")
    while not engine.step():
        pass  # until the prefill has produced a token
    assert engine.abort("gone")
    ((seen, stats),) = observer.finished
    assert seen.request_id == "gone" and seen.finished
    assert seen.outputs[0].finish_reason == "abort"
    assert stats["num_prompt_tokens"] == len(PROMPTS[0])
    assert 1 <= stats["num_generated_tokens"] < 50
    assert stats["arrival_time"] <= stats["finish_time"]
    assert not engine.abort("gone")  # once
    assert len(observer.finished) == 1
