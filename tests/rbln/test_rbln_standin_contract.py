"""Contract tests: the exact optimum-rbln calls the rbln plugin makes, checked by a stand-in.

Nothing here touches an RBLN NPU or the real SDK (the compiler 'rebel' is not
on pypi.org). The stand-in (standin.py) keeps optimum-rbln 0.12.0's
signatures and rules; SDK_SIGNATURES below is a snapshot of the real ones,
compared with the installed SDK wherever it can be imported.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import types

import pytest
import torch

from llmcore.contract import ScheduledBatch, ScheduledSeq
from llmcore.errors import ConfigError, PluginError
from llmcore.sampling_params import SamplingParams
from llmcore.testing.configs import llama2_7b
from llmcore_rbln import planning
from tests.rbln import standin

#: stand-in tests: the SDK is played by tests/rbln/standin.py; nothing here ran on RBLN hardware
pytestmark = pytest.mark.standin

#: from optimum-rbln 0.12.0's source
SDK_SIGNATURES = {
    "RBLNBaseModel.from_pretrained": ("model_id", "export", "rbln_config", "kwargs"),
    "RBLNBaseModel.save_pretrained": ("self", "save_directory", "push_to_hub", "kwargs"),
    "RBLNRuntimeModel.forward": (
        "self", "input_ids", "inputs_embeds", "cache_position", "attention_mask", "batch_idx", "block_tables",
        "position_embed", "position_ids", "token_type_ids", "local_block_tables", "lora_int_ids"),
}


def params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def compiled(make_device, model_config, model, tmp_path, extra=None, **settings):
    device = make_device(**(extra or {}))
    plan_settings = dict(batch_size=2, max_seq_len=64, dtype="float16")
    plan_settings.update(settings)
    plan = device.plan(model_config, **plan_settings)
    out = tmp_path / "artifact"
    out.mkdir()
    meta = device.compile(model, model_config, plan, out, progress=False)
    return device, plan, out, meta


def entry(key, history, start, end):
    return ScheduledSeq(seq_id=0, key=key, token_ids=list(history[start:end]), start_pos=start, block_table=[],
                        params=SamplingParams(temperature=0.0), history=history, num_prompt_tokens=end,
                        sample=end == len(history), seeds=[None], rng_keys=[key])


class TestRblnCompileContract:
    def test_compile_exports_with_the_plans_rbln_settings_and_saves(self, optimum_rbln, make_device,
                                                                  model_config, tiny_model, tmp_path):
        _, plan, out, meta = compiled(make_device, model_config, tiny_model, tmp_path)
        rec = optimum_rbln.recorder
        assert rec.names() == ["from_pretrained", "save_pretrained"]
        call = rec.last("from_pretrained")
        assert (call["model_id"], call["export"], call["rbln_config"]) == (str(tiny_model), True, None)
        assert call["kwargs"] == {
            "dtype": torch.float16,
            "rbln_batch_size": 2, "rbln_max_seq_len": 64, "rbln_num_devices": 1,
            "rbln_attn_impl": "eager", "rbln_kvcache_block_size": 64, "rbln_kvcache_num_blocks": 2,
            "rbln_decoder_batch_sizes": [2], "rbln_create_runtimes": False,
            # no card here: compile for the default target instead of asking the driver
            "rbln_npu": "RBLN-CA25",
        }
        assert rec.warnings == [], "no deprecated rbln_* names"
        assert rec.last("save_pretrained")["save_directory"] == str(out)
        cfg = json.loads((out / "rbln_config.json").read_text())
        assert meta["rbln_config"] == cfg and meta["npu"] == "RBLN-CA25"
        assert (cfg["batch_size"], cfg["max_seq_len"], cfg["dtype"]) == (2, 64, "float16")
        assert "num_devices" not in cfg and {c["num_devices"] for c in cfg["_compile_cfgs"]} == {1}
        assert {"prefill.rbln", "decoder_batch_2.rbln", "rbln_config.json", "config.json"} <= set(meta["files"])
        json.dumps(meta)

    def test_configured_npu_and_prefill_chunk_reach_the_sdk(self, optimum_rbln, make_device, model_config,
                                                            tiny_model, tmp_path):
        compiled(make_device, model_config, tiny_model, tmp_path,
                 extra={"rbln_npu": "RBLN-CA12", "rbln_prefill_chunk_size": 256})
        kw = optimum_rbln.recorder.last("from_pretrained")["kwargs"]
        assert (kw["rbln_npu"], kw["rbln_prefill_chunk_size"]) == ("RBLN-CA12", 256)

    def test_decode_buckets_become_decoder_batch_sizes(self, optimum_rbln, make_device, model_config, tiny_model,
                                                      tmp_path):
        device, plan, out, meta = compiled(make_device, model_config, tiny_model, tmp_path, batch_buckets=[1, 2])
        assert optimum_rbln.recorder.last("from_pretrained")["kwargs"]["rbln_decoder_batch_sizes"] == [2, 1]
        assert "decoder_batch_1.rbln" in meta["files"]
        runner = device.create_static_runner(out, plan, model_config, tiny_model, [2])
        a = [1, 9, 4]
        (r,) = runner.execute(ScheduledBatch(seqs=[entry("a:0", a, 0, 3)]))
        a.append(r.token_ids[0])
        runner.execute(ScheduledBatch(seqs=[entry("a:0", a, 3, 4)]))
        assert optimum_rbln.recorder.names()[-1] == "decode[1]", "one live sequence uses the batch-1 decoder"

    def test_flash_attention_settings_pass_the_sdks_rules(self):
        plan = planning.plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=4, block_size=1024)
        kw = planning.sdk_kwargs(plan, "RBLN-CA25", True, None)
        assert (kw["rbln_attn_impl"], kw["rbln_kvcache_partition_len"], kw["rbln_kvcache_block_size"]) == (
            "flash_attn", 1024, 1024)
        assert kw["rbln_kvcache_num_blocks"] == 16  # 4 slots x 4096 / 1024
        hf = types.SimpleNamespace(max_position_embeddings=4096)
        cfg = standin.resolve_config({k[5:]: v for k, v in kw.items()}, hf, "float16")
        assert (cfg["attn_impl"], cfg["kvcache_num_blocks"], cfg["_requires_batch_sort"]) == ("flash_attn", 16, False)

    def test_quantized_checkpoint_compiles_with_rbln_quantization(self, optimum_rbln, make_device, model_config,
                                                                 tiny_model, tmp_path):
        from safetensors.torch import load_file, save_file

        quantized = tmp_path / "quantized"
        shutil.copytree(tiny_model, quantized)
        weights = quantized / "model.safetensors"
        tensors = load_file(str(weights))
        tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(1)
        save_file(tensors, str(weights))
        _, plan, out, meta = compiled(make_device, model_config, quantized, tmp_path, quantization="rbln-w4a16",
                                      dtype=None)
        kw = optimum_rbln.recorder.last("from_pretrained")["kwargs"]
        assert kw["rbln_quantization"] == {"format": "rbln", "weights": "int4", "activations": "fp16",
                                           "kv_caches": "fp16"}
        assert "dtype" not in kw, "quantized checkpoints keep the dtype of their weights and scales"
        assert meta["rbln_config"]["quantization"]["weights"] == "int4"
        assert meta["rbln_config"]["dtype"] == "float32", "optimum-rbln compiles quantized checkpoints in float32"
        assert plan.dtype == "float32" and plan.quantization == "rbln-w4a16"

    def test_quantization_needs_a_prequantized_checkpoint(self, optimum_rbln, make_device, model_config,
                                                         tiny_model, tmp_path):
        device = make_device()
        plan = device.plan(model_config, batch_size=2, max_seq_len=64, quantization="rbln-w8a16")
        with pytest.raises(ConfigError, match="needs a checkpoint pre-quantized for RBLN"):
            device.compile(tiny_model, model_config, plan, tmp_path, progress=False)
        assert optimum_rbln.recorder.calls == []

    def test_missing_sdk_says_what_to_install(self, monkeypatch, make_device, model_config, tiny_model, tmp_path):
        monkeypatch.setitem(sys.modules, "optimum.rbln", None)
        device = make_device()
        plan = device.plan(model_config, batch_size=2, max_seq_len=64)
        with pytest.raises(PluginError) as err:
            device.compile(tiny_model, model_config, plan, tmp_path, progress=False)
        msg = str(err.value)
        assert "optimum-rbln could not be imported" in msg
        assert "rebel-compiler" in msg and "pip install 'llmcore[rbln]'" in msg


class TestRblnServeContract:
    def test_serve_loads_the_compiled_folder(self, optimum_rbln, make_device, model_config, tiny_model, tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        device.create_static_runner(out, plan, model_config, tiny_model, [2])
        assert optimum_rbln.recorder.last("from_pretrained") == {
            "model_id": str(out), "export": False, "rbln_config": None, "kwargs": {}}

    def test_runtime_inputs_use_the_runners_block_tables(self, optimum_rbln, make_device, model_config, tiny_model,
                                                         tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        runner = device.create_static_runner(out, plan, model_config, tiny_model, [2])
        rec = optimum_rbln.recorder
        a, b = [1, 7, 9], [1, 3, 5, 8]
        ra, rb = runner.execute(ScheduledBatch(seqs=[entry("a:0", a, 0, 3), entry("b:0", b, 0, 4)]))
        prefill = rec.calls[-2][1]
        assert rec.calls[-2][0] == "prefill[1]"
        assert prefill["input_ids"].tolist() == [a] and prefill["input_ids"].dtype == torch.int64
        assert prefill["cache_position"].tolist() == [[0, 1, 2]] and prefill["cache_position"].dtype == torch.int32
        assert prefill["block_tables"].tolist() == [0] and prefill["block_tables"].dtype == torch.int16
        assert rec.calls[-1][1]["block_tables"].tolist() == [1], "slot 1 owns block 1"
        a.append(ra.token_ids[0])
        b.append(rb.token_ids[0])
        runner.execute(ScheduledBatch(seqs=[entry("a:0", a, 3, 4), entry("b:0", b, 4, 5)]))
        name, decode = rec.calls[-1]
        assert name == "decode[2]"
        assert decode["input_ids"].tolist() == [[a[-1]], [b[-1]]]
        assert decode["cache_position"].tolist() == [[3], [4]]
        assert decode["block_tables"].tolist() == [[0], [1]]

    def test_artifacts_that_need_sorted_batches_get_them(self, optimum_rbln, make_device, model_config,
                                                         tiny_model, tmp_path):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        cfg = json.loads((out / "rbln_config.json").read_text())
        cfg["_requires_batch_sort"] = True  # what the SDK resolves for flash attention on RBLN-CR13+
        (out / "rbln_config.json").write_text(json.dumps(cfg))
        runner = device.create_static_runner(out, plan, model_config, tiny_model, [2])
        a, b = [1, 7], [1, 3, 5, 8, 2]
        ra, rb = runner.execute(ScheduledBatch(seqs=[entry("a:0", a, 0, 2), entry("b:0", b, 0, 5)]))
        a.append(ra.token_ids[0])
        b.append(rb.token_ids[0])
        ra, rb = runner.execute(ScheduledBatch(seqs=[entry("a:0", a, 2, 3), entry("b:0", b, 5, 6)]))
        decode = optimum_rbln.recorder.calls[-1][1]
        assert decode["cache_position"].tolist() == [[5], [2]], "longest first"
        assert decode["block_tables"].tolist() == [[1], [0]]
        assert ra.token_ids and rb.token_ids

    @pytest.mark.parametrize("field,value,expect", [
        ("max_seq_len", 128, "max_seq_len: "),
        ("kvcache_num_blocks", 1, "kvcache_num_blocks: "),
        ("dtype", "bfloat16", "dtype: "),
        ("decoder_batch_sizes", [2, 1], "decoder_batch_sizes: "),
    ])
    def test_artifact_that_disagrees_with_the_plan_is_refused(self, optimum_rbln, make_device, model_config,
                                                             tiny_model, tmp_path, field, value, expect):
        device, plan, out, _ = compiled(make_device, model_config, tiny_model, tmp_path)
        cfg = json.loads((out / "rbln_config.json").read_text())
        before = cfg[field]
        cfg[field] = value
        (out / "rbln_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError) as err:
            device.create_static_runner(out, plan, model_config, tiny_model, [2])
        msg = str(err.value)
        assert expect in msg and repr(value) in msg, msg
        if field != "kvcache_num_blocks":
            assert f"the plan has {before!r}" in msg
        assert "llmcore compile --device rbln" in msg

    def test_older_tensor_parallel_size_key_is_read(self):
        plan = planning.plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=4)
        cfg = {"batch_size": 4, "max_seq_len": 4096, "tensor_parallel_size": 4, "kvcache_block_size": 4096,
               "attn_impl": "eager", "decoder_batch_sizes": [4], "dtype": "float16", "kvcache_num_blocks": 4}
        planning.reconcile_artifact(cfg, plan, "RBLN-CA25")


class TestRblnSdkSignatures:
    def test_stand_in_has_the_sdk_signatures(self):
        cls = standin.RBLNDecoderOnlyModelForCausalLM
        assert params(cls.from_pretrained) == SDK_SIGNATURES["RBLNBaseModel.from_pretrained"]
        assert params(cls.save_pretrained) == SDK_SIGNATURES["RBLNBaseModel.save_pretrained"]
        assert params(standin.StandinRuntime.forward) == SDK_SIGNATURES["RBLNRuntimeModel.forward"]

    def test_installed_sdk_still_has_them(self):
        """Runs where optimum-rbln imports (the RBLN compiler installed); skipped elsewhere."""
        rbln = pytest.importorskip("optimum.rbln")
        from optimum.rbln.transformers.models.decoderonly.decoderonly_runtime_utils import RBLNRuntimeModel

        cls = rbln.RBLNLlamaForCausalLM
        assert params(cls.from_pretrained) == SDK_SIGNATURES["RBLNBaseModel.from_pretrained"]
        assert params(cls.save_pretrained) == SDK_SIGNATURES["RBLNBaseModel.save_pretrained"]
        assert params(RBLNRuntimeModel.forward) == SDK_SIGNATURES["RBLNRuntimeModel.forward"]
        config_keys = set(params(rbln.RBLNLlamaForCausalLMConfig.__init__)) - {"self", "kwargs", "_requires_batch_sort",
                                                                                "_compile_cfgs", "optimize_host_memory"}
        assert config_keys <= standin.CONFIG_KEYS | {"kvcache_metas"}
