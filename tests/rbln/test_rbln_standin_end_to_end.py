"""compile -> compile cache -> Engine(compiled=...) -> the rbln runner, with the optimum-rbln stand-in.

The card is made to look present (a /dev/rbln0 and the SDK) and the stand-in
plays the NPU; everything else is llmcore's real path. The stand-in's logits are
transformers' on the tokens the runner wrote through its block tables, so a wrong
slot or position shows up as a token that differs from transformers' greedy output;
the SDK's own numerics are not tested here.
"""

from __future__ import annotations

import pytest

#: stand-in tests: the SDK is played by tests/rbln/standin.py; nothing here ran on RBLN hardware
pytestmark = pytest.mark.standin


PROMPTS = [[1, 4093, 532, 9043, 310, 28, 1711], [1, 742, 18], [1, 30210, 995, 12, 7]]


@pytest.fixture
def rbln_present(monkeypatch, optimum_rbln, tmp_path):
    from llmcore_rbln import sdk

    monkeypatch.setattr(sdk, "rbln_devices", lambda dev="/dev": ["rbln0"])
    monkeypatch.setattr(sdk, "missing_sdk", lambda: [])
    monkeypatch.delenv("LLMCORE_RBLN_NPU", raising=False)
    monkeypatch.setenv("LLMCORE_CACHE_DIR", str(tmp_path / "cache"))
    return optimum_rbln


def greedy(reference, prompt, n):
    out = list(prompt)
    for _ in range(n):
        out.append(reference.greedy(out)[0])
    return out[len(prompt):]


def test_standin_rbln_artifact_feeds_the_right_slots_and_positions(rbln_present, tiny_model):
    from llmcore import Engine, SamplingParams
    from llmcore.compiled import CompileRequest, compile_model
    from llmcore.testing.reference import HFReference

    outcome = compile_model(CompileRequest(device="rbln", model=str(tiny_model), batch_size=2, max_seq_len=64,
                                           dtype="float32"), show_progress=False)
    kw = rbln_present.recorder.last("from_pretrained")["kwargs"]
    assert kw["rbln_decoder_batch_sizes"] == [2], "RBLN plans one decode graph at the full batch by default"
    assert "rbln_npu" not in kw, "a card is present: the SDK targets it"

    engine = Engine(compiled=outcome.entry.digest[:16], progress=False)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(PROMPTS, params)
    reference = HFReference.from_pretrained(tiny_model)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.outputs[0].token_ids == greedy(reference, prompt, 6)


def test_a_directory_saved_by_the_sdk_serves_through_engine_compiled_dir(rbln_present, tiny_model, tmp_path):
    from llmcore import Engine, SamplingParams
    from llmcore.config import EngineConfig
    from llmcore.errors import ConfigError
    from llmcore.models.config import ModelConfig
    from llmcore.testing.reference import HFReference
    from llmcore_rbln import plugin

    # what a vllm-rbln user has: optimum-rbln's from_pretrained(export=True) + save_pretrained output
    device = plugin.llmcore_create_device(name="rbln", config=EngineConfig(device="rbln"))
    mc = ModelConfig.from_path(tiny_model)
    plan = device.plan(mc, batch_size=2, max_seq_len=64, dtype="float32")
    vendor = tmp_path / "rbln-compiled"
    vendor.mkdir()
    device.compile(tiny_model, mc, plan, vendor, progress=False)

    with pytest.raises(ConfigError, match="max_num_seqs: requested 4, compiled batch_size 2"):
        Engine(compiled=str(vendor), model=str(tiny_model), max_num_seqs=4, progress=False)
    engine = Engine(compiled=str(vendor), model=str(tiny_model), progress=False)
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    reference = HFReference.from_pretrained(tiny_model)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.outputs[0].token_ids == greedy(reference, prompt, 6)
