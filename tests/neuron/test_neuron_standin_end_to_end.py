"""compile -> compile cache -> Engine(compiled=...) -> the neuron runner, with the optimum-neuron stand-in.

The device is made to look present (a /dev/neuron0, the runtime, the SDK) and
the stand-in plays the compiled model; everything else is llmcore's real path:
`llmcore compile`'s API, the cache entry, the static-slot engine, the plugin's
runner. The stand-in's logits are transformers' on the tokens the runner wrote into
each slot's KV, so a wrong slot or position shows up as a token that differs from
transformers' greedy output; the SDK's own numerics are not tested here.
"""

from __future__ import annotations

import pytest

#: stand-in tests: the SDK is played by tests/neuron/standin.py; nothing here ran on Neuron hardware
pytestmark = pytest.mark.standin


PROMPTS = [[1, 4093, 532, 9043, 310, 28, 1711], [1, 742, 18], [1, 30210, 995, 12, 7]]


@pytest.fixture
def neuron_present(monkeypatch, optimum_neuron, tmp_path):
    from llmcore_neuron import sdk

    monkeypatch.setattr(sdk, "neuron_devices", lambda dev="/dev": ["neuron0"])
    monkeypatch.setattr(sdk, "runtime_library", lambda: "/opt/aws/neuron/lib/libnrt.so.1")
    monkeypatch.setattr(sdk, "missing_sdk", lambda: [])
    monkeypatch.setattr(sdk, "instance_family", lambda: "inf2")
    monkeypatch.setenv("LLMCORE_CACHE_DIR", str(tmp_path / "cache"))
    return optimum_neuron


def greedy(reference, prompt, n):
    out = list(prompt)
    for _ in range(n):
        out.append(reference.greedy(out)[0])
    return out[len(prompt):]


def test_standin_neuron_artifact_feeds_the_right_slots_and_positions(neuron_present, tiny_model):
    from llmcore import Engine, SamplingParams
    from llmcore.compiled import CompileRequest, compile_model
    from llmcore.testing.reference import HFReference

    outcome = compile_model(CompileRequest(device="neuron", model=str(tiny_model), batch_size=2, max_seq_len=64,
                                           dtype="float32"), show_progress=False)
    assert not outcome.hit
    meta = outcome.entry.metadata["device_metadata"]
    assert meta["neuron_config"]["batch_size"] == 2 and meta["neuron_config"]["torch_dtype"] == "float32"
    again = compile_model(CompileRequest(device="neuron", model=str(tiny_model), batch_size=2, max_seq_len=64,
                                         dtype="float32"), show_progress=False)
    assert again.hit and neuron_present.recorder.names().count("export") == 1

    engine = Engine(compiled=outcome.entry.digest[:16], progress=False)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(PROMPTS, params)  # three prompts through two slots
    reference = HFReference.from_pretrained(tiny_model)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.outputs[0].token_ids == greedy(reference, prompt, 6)


def test_on_device_sampling_artifact_serves_greedy_and_refuses_host_only_options(neuron_present, tiny_model):
    from llmcore import Engine, SamplingParams
    from llmcore.compiled import CompileRequest, compile_model
    from llmcore.errors import RequestError
    from llmcore.testing.reference import HFReference

    request = CompileRequest(device="neuron", model=str(tiny_model), batch_size=2, max_seq_len=64, dtype="float32",
                             settings={"neuron_on_device_sampling": True})
    outcome = compile_model(request, show_progress=False)
    assert outcome.entry.metadata["device_metadata"]["neuron_config"]["on_device_sampling"] is True
    assert "--on-device-sampling" in outcome.entry.metadata["recompile_command"]
    engine = Engine(compiled=outcome.entry.digest[:16], progress=False)
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    reference = HFReference.from_pretrained(tiny_model)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.outputs[0].token_ids == greedy(reference, prompt, 6)
    with pytest.raises(RequestError, match="logprobs=2: needs logits on the host"):
        engine.generate(PROMPTS[:1], SamplingParams(max_tokens=2, logprobs=2))
