"""Contract tests: the exact optimum-neuron calls the neuron plugin makes, checked by a stand-in.

Nothing here touches Neuron hardware or the real SDK (neither exists on these
machines). The stand-in (standin.py) keeps optimum-neuron 0.4.5's signatures and
rules; SDK_SIGNATURES below is a snapshot of the real ones, compared with the
installed SDK wherever it can be imported, so an upstream change shows up here.
"""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch

from llmcore.contract import ScheduledBatch, ScheduledSeq
from llmcore.errors import ConfigError, PluginError, RequestError
from llmcore.sampling_params import SamplingParams
from tests.neuron import standin

#: stand-in tests: the SDK is played by tests/neuron/standin.py; nothing here ran on Neuron hardware
pytestmark = pytest.mark.standin

#: parameter names of the entry points the plugin uses, from optimum-neuron 0.4.5's source
SDK_SIGNATURES = {
    "NeuronModelForCausalLM.get_neuron_config": (
        "model_name_or_path", "config", "token", "revision", "instance_type", "batch_size",
        "sequence_length", "tensor_parallel_size"),
    "NeuronModelForCausalLM.export": (
        "model_id", "neuron_config", "config", "token", "revision", "load_weights", "kwargs"),
    "NeuronModelForCausalLM.from_pretrained": ("model_id", "kwargs"),
    "NxDModelForCausalLM.forward": (
        "self", "input_ids", "position_ids", "seq_ids", "sampling_params", "output_attentions",
        "output_hidden_states", "return_dict"),
    "NeuronPreTrainedModel.save_pretrained": ("self", "save_directory", "kwargs"),
}


def params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def compiled(make_device, model_config, tiny_model, tmp_path, **plan_settings):
    device = make_device(**plan_settings.pop("extra", {}))
    settings = dict(batch_size=2, max_seq_len=64, dtype="bfloat16")
    settings.update(plan_settings)
    plan = device.plan(model_config, **settings)
    out = tmp_path / "artifact"
    out.mkdir()
    meta = device.compile(tiny_model, model_config, plan, out, progress=False)
    return device, plan, out, meta


def entry(key, history, start, end):
    return ScheduledSeq(seq_id=0, key=key, token_ids=list(history[start:end]), start_pos=start, block_table=[],
                        params=SamplingParams(temperature=0.0), history=history, num_prompt_tokens=end,
                        sample=end == len(history), seeds=[None], rng_keys=[key])


class TestNeuronExportContract:
    def test_compile_asks_for_a_neuron_config_exports_and_saves(self, optimum_neuron, make_device, model_config,
                                                               tiny_model, tmp_path):
        device, plan, out, meta = compiled(make_device, model_config, tiny_model, tmp_path)
        rec = optimum_neuron.recorder
        assert rec.names() == ["get_neuron_config", "export", "save_pretrained"]
        get = rec.last("get_neuron_config")
        assert get["model_name_or_path"] == str(tiny_model)
        assert (get["instance_type"], get["batch_size"], get["sequence_length"], get["tensor_parallel_size"]) == (
            "inf2", 2, 64, 1)
        assert get["config"].dtype == torch.bfloat16 and get["token"] is None and get["revision"] is None
        export = rec.last("export")
        assert export["model_id"] == str(tiny_model)
        assert export["config"] is get["config"] and export["load_weights"] is False and export["kwargs"] == {}
        nc = export["neuron_config"]
        assert (nc.batch_size, nc.sequence_length, nc.tp_degree, nc.torch_dtype) == (2, 64, 1, torch.bfloat16)
        assert nc.on_device_sampling is False, "llmcore samples on the host: the graphs must return logits"
        assert nc.continuous_batching is True and nc.ctx_batch_size == 1 and nc.max_context_length == 64
        assert rec.last("save_pretrained")["save_directory"] == str(out)
        saved = json.loads((out / "neuron_config.json").read_text())
        assert meta["neuron_config"] == saved and meta["target"] == "inf2"
        assert {"config.json", "model.pt", "neuron_config.json",
                "checkpoint/weights/tp0_sharded_checkpoint.safetensors"} <= set(meta["files"])
        json.dumps(meta)

    @pytest.mark.parametrize("dtype", ["float16", "float32"])
    def test_export_dtype_is_the_plan_dtype(self, optimum_neuron, make_device, model_config, tiny_model, tmp_path,
                                           dtype):
        _, plan, out, meta = compiled(make_device, model_config, tiny_model, tmp_path, dtype=dtype)
        assert optimum_neuron.recorder.last("get_neuron_config")["config"].dtype == getattr(torch, dtype)
        assert meta["neuron_config"]["torch_dtype"] == dtype

    def test_target_and_tensor_parallel_reach_the_sdk(self, optimum_neuron, make_device, model_config, tiny_model,
                                                      tmp_path):
        _, plan, out, meta = compiled(make_device, model_config, tiny_model, tmp_path, tensor_parallel=2,
                                      extra={"neuron_target": "trn1"})
        get = optimum_neuron.recorder.last("get_neuron_config")
        assert (get["instance_type"], get["tensor_parallel_size"]) == ("trn1", 2)
        assert meta["neuron_config"]["tp_degree"] == 2 and meta["neuron_config"]["target"] == "trn1"
        assert (out / "checkpoint/weights/tp1_sharded_checkpoint.safetensors").is_file()

    def test_batch_of_one_has_no_continuous_batching(self, optimum_neuron, make_device, model_config, tiny_model,
                                                     tmp_path):
        device, plan, out, meta = compiled(make_device, model_config, tiny_model, tmp_path, batch_size=1)
        assert meta["neuron_config"]["continuous_batching"] is False
        runner = device.create_static_runner(out, plan, model_config, tiny_model, [2])
        (r,) = runner.execute(ScheduledBatch(seqs=[entry("x:0", [1, 5, 9], 0, 3)]))
        assert len(r.token_ids) == 1

    def test_unsupported_model_is_refused_before_any_sdk_call(self, optimum_neuron, make_device, model_config,
                                                            tiny_model, tmp_path):
        import dataclasses

        mistral = dataclasses.replace(model_config, architecture="MistralForCausalLM", model_type="mistral")
        with pytest.raises(ConfigError, match="no optimum-neuron decoder implementation"):
            make_device().plan(mistral, batch_size=2, max_seq_len=64)
        assert optimum_neuron.recorder.calls == []

    def test_missing_sdk_says_what_to_install(self, monkeypatch, make_device, model_config, tiny_model, tmp_path):
        monkeypatch.setitem(sys.modules, "optimum.neuron", None)  # import fails like an absent SDK
        device = make_device()
        plan = device.plan(model_config, batch_size=2, max_seq_len=64)
        with pytest.raises(PluginError) as err:
            device.compile(tiny_model, model_config, plan, tmp_path, progress=False)
        msg = str(err.value)
        assert "optimum-neuron could not be imported" in msg
        assert "pip install 'llmcore[neuron]'" in msg and "pip.repos.neuron.amazonaws.com" in msg


class TestNeuronServeContract:
    def test_serve_loads_the_artifact_folder_only(self, optimum_neuron, make_device, model_config, tiny_model,
                                                  tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        device.create_static_runner(out, plan, model_config, tiny_model, [2])
        assert optimum_neuron.recorder.last("from_pretrained") == {"model_id": str(out), "kwargs": {}}

    def test_forward_inputs_follow_the_compiled_graphs(self, optimum_neuron, make_device, model_config, tiny_model,
                                                       tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        runner = device.create_static_runner(out, plan, model_config, tiny_model, [2])
        rec = optimum_neuron.recorder
        a, b = [1, 7, 9, 11], [1, 3]
        ra, rb = runner.execute(ScheduledBatch(seqs=[entry("a:0", a, 0, 4), entry("b:0", b, 0, 2)]))
        prefills = [args for name, args in rec.calls if name == "forward"]
        assert len(prefills) == 2, "continuous batching: one context-encoding call per prompt"
        first = prefills[0]
        assert first["input_ids"].tolist() == [a] and first["input_ids"].dtype == torch.int64
        assert first["position_ids"].tolist() == [[0, 1, 2, 3]]
        assert first["seq_ids"].tolist() == [0] and prefills[1]["seq_ids"].tolist() == [1]
        assert tuple(first["sampling_params"].shape) == (1, 3)
        a.append(ra.token_ids[0])
        (ra,) = runner.execute(ScheduledBatch(seqs=[entry("a:0", a, 4, 5)]))
        decode = rec.calls[-1][1]
        # every slot is passed: slot 1 (b, idle) re-feeds its last token at its own position
        assert decode["input_ids"].tolist() == [[a[-1]], [b[-1]]]
        assert decode["position_ids"].tolist() == [[4], [1]]
        assert decode["seq_ids"].tolist() == [0, 1]
        assert tuple(decode["sampling_params"].shape) == (2, 3)

    def test_artifact_that_disagrees_with_the_plan_is_refused(self, optimum_neuron, make_device, model_config,
                                                             tiny_model, tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        cfg = json.loads((out / "neuron_config.json").read_text())
        cfg["sequence_length"] = 128
        (out / "neuron_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError) as err:
            device.create_static_runner(out, plan, model_config, tiny_model, [2])
        msg = str(err.value)
        assert "sequence_length: " in msg and "has 128, the plan has 64" in msg
        assert "llmcore compile --device neuron" in msg
        assert "from_pretrained" not in optimum_neuron.recorder.names()

    def test_artifact_with_on_device_sampling_is_refused(self, optimum_neuron, make_device, model_config,
                                                         tiny_model, tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        cfg = json.loads((out / "neuron_config.json").read_text())
        cfg["on_device_sampling"] = True
        (out / "neuron_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match="on_device_sampling: .* has True, the plan has False"):
            device.create_static_runner(out, plan, model_config, tiny_model, [2])

    def test_too_many_sequences_are_refused_before_any_device_call(self, optimum_neuron, make_device,
                                                                   model_config, tiny_model, tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        runner = device.create_static_runner(out, plan, model_config, tiny_model, [2])
        seqs = [entry(f"r{i}:0", [1, 2, 3], 0, 3) for i in range(3)]
        with pytest.raises(RequestError, match="batch=3: exceeds the compiled batch size 2"):
            runner.execute(ScheduledBatch(seqs=seqs))
        assert "forward" not in optimum_neuron.recorder.names()

    def test_prompt_logprobs_are_refused_clearly(self, optimum_neuron, make_device, model_config, tiny_model,
                                                 tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        runner = device.create_static_runner(out, plan, model_config, tiny_model, [2])
        e = entry("a:0", [1, 2, 3], 0, 3)
        e.params = SamplingParams(prompt_logprobs=1)
        e.want_prompt_logprobs = True
        with pytest.raises(RequestError, match="prompt_logprobs.*not available on neuron"):
            runner.execute(ScheduledBatch(seqs=[e]))


class TestNeuronSdkSignatures:
    def test_stand_in_has_the_sdk_signatures(self):
        assert params(standin.NeuronModelForCausalLM.get_neuron_config) == \
            SDK_SIGNATURES["NeuronModelForCausalLM.get_neuron_config"]
        assert params(standin.NeuronModelForCausalLM.export) == SDK_SIGNATURES["NeuronModelForCausalLM.export"]
        assert params(standin.NeuronModelForCausalLM.from_pretrained) == \
            SDK_SIGNATURES["NeuronModelForCausalLM.from_pretrained"]
        assert params(standin.StandinNxDModel.forward) == SDK_SIGNATURES["NxDModelForCausalLM.forward"]
        assert params(standin.StandinNxDModel.save_pretrained) == SDK_SIGNATURES["NeuronPreTrainedModel.save_pretrained"]

    def test_installed_sdk_still_has_them(self):
        """Runs where optimum-neuron imports (a Neuron SDK host); skipped elsewhere."""
        neuron = pytest.importorskip("optimum.neuron")
        pytest.importorskip("neuronx_distributed")  # the NxD model classes need it (Neuron's index only)
        from optimum.neuron.models.inference.backend.modules.decoder.modeling_decoder import NxDModelForCausalLM
        from optimum.neuron.models.inference.modeling_utils import NeuronPreTrainedModel

        auto = neuron.NeuronModelForCausalLM
        assert params(auto.get_neuron_config) == SDK_SIGNATURES["NeuronModelForCausalLM.get_neuron_config"]
        assert params(auto.export) == SDK_SIGNATURES["NeuronModelForCausalLM.export"]
        assert params(auto.from_pretrained) == SDK_SIGNATURES["NeuronModelForCausalLM.from_pretrained"]
        assert params(NxDModelForCausalLM.forward) == SDK_SIGNATURES["NxDModelForCausalLM.forward"]
        assert params(NeuronPreTrainedModel.save_pretrained) == SDK_SIGNATURES["NeuronPreTrainedModel.save_pretrained"]
