"""RBLN planning and probing, for real: sizing a plan and reading /dev need no SDK."""

from __future__ import annotations

import dataclasses

import pytest

from llmcore.compiled import vendor
from llmcore.compiled.vendor import UNVERIFIED
from llmcore.errors import ConfigError
from llmcore.testing.configs import llama2_7b, smollm2_135m
from llmcore_rbln import plugin, sdk
from llmcore_rbln.planning import plan_for, sdk_kwargs

GIB, MIB = 2**30, 2**20
ATOM_BYTES = 16 * GIB - 288 * MIB


@pytest.fixture(autouse=True)
def no_npu_env(monkeypatch):
    monkeypatch.delenv("LLMCORE_RBLN_NPU", raising=False)


class TestLlama2OnAtom:
    def test_tp4_fits_with_eager_attention(self):
        plan = plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=4)
        assert (plan.dtype, plan.block_size, plan.batch_buckets, plan.memory_limit) == (
            "float16", 4096, (4,), ATOM_BYTES)
        assert (plan.weight_bytes_per_core, plan.kv_bytes_per_core) == (3_369_207_808, 2 * GIB)
        assert plan.memory_per_core == 6_068_360_601
        kw = sdk_kwargs(plan, "RBLN-CA25", False, None)
        assert (kw["rbln_attn_impl"], kw["rbln_kvcache_block_size"], kw["rbln_kvcache_num_blocks"]) == ("eager", 4096, 4)
        assert kw["rbln_num_devices"] == 4 and "rbln_npu" not in kw

    def test_eight_slots_on_two_cards_fit_by_16_mib(self):
        plan = plan_for(llama2_7b(), batch_size=8, max_seq_len=4096, tensor_parallel=2)
        assert plan.memory_per_core == 16_861_185_228
        assert ATOM_BYTES - plan.memory_per_core == 16_694_068

    def test_one_card_is_too_small(self):
        with pytest.raises(ConfigError, match="needs ~22.6 GiB per core .* more than rbln's 16 GiB"):
            plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=1)

    @pytest.mark.parametrize("block", [1024, 2048])
    def test_flash_attention_partitions(self, block):
        plan = plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=4, block_size=block)
        kw = sdk_kwargs(plan, "RBLN-CA25", True, None)
        assert (kw["rbln_attn_impl"], kw["rbln_kvcache_partition_len"]) == ("flash_attn", block)
        assert kw["rbln_kvcache_num_blocks"] == 4 * 4096 // block

    @pytest.mark.parametrize("block,match", [
        (16, r"is not a flash-attention partition length on ATOM \(1024..32768\)"),
        (512, r"is not a flash-attention partition length"),
        (3072, r"must divide max_seq_len=4096 at least twice"),
        (8192, r"must divide max_seq_len=4096"),
    ])
    def test_block_sizes_the_sdk_would_reject(self, block, match):
        with pytest.raises(ConfigError, match=match) as err:
            plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=4, block_size=block)
        assert "Use --block-size 4096 (eager attention" in str(err.value)

    def test_long_context_defaults_to_flash_attention(self):
        long = dataclasses.replace(llama2_7b(), max_position_embeddings=65536)
        plan = plan_for(long, batch_size=1, max_seq_len=65536, tensor_parallel=16)
        assert plan.block_size == 16384  # ATOM's default partition: eager stops at 32768
        rebel = plan_for(long, batch_size=1, max_seq_len=32768, tensor_parallel=1, npu="RBLN-CR03")
        assert rebel.block_size == 8192 and rebel.memory_limit == 140 * GIB
        with pytest.raises(ConfigError, match="eager attention on REBEL allows max_seq_len <= 16384"):
            plan_for(long, batch_size=1, max_seq_len=32768, block_size=32768, npu="RBLN-CR03")


class TestSmolLM2AndOptions:
    def test_fp16_plan_with_eager_attention(self):
        plan = plan_for(smollm2_135m(), batch_size=4, max_seq_len=8192)
        assert (plan.dtype, plan.block_size, plan.tensor_parallel) == ("float16", 8192, 1)
        assert plan.kv_bytes_per_core == 4 * 8192 * 2 * 30 * 3 * 64 * 2

    def test_decode_buckets(self):
        plan = plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048, batch_buckets=[1, 2])
        assert plan.batch_buckets == (1, 2, 4)
        assert sdk_kwargs(plan, "RBLN-CA25", True, None)["rbln_decoder_batch_sizes"] == [4, 2, 1]

    def test_quantization_methods(self):
        plan = plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048, quantization="rbln-w4a16")
        # optimum-rbln compiles quantized checkpoints in float32: activations and KV at 4 bytes
        assert plan.quantization == "rbln-w4a16" and plan.dtype == "float32"
        assert plan.weight_bytes_per_core == smollm2_135m().num_params() // 2
        fp16 = plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048)
        assert plan.kv_bytes_per_core == 2 * fp16.kv_bytes_per_core
        with pytest.raises(ConfigError, match="optimum-rbln compiles rbln-w8a8 checkpoints in float32"):
            plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048, quantization="rbln-w8a8", dtype="bfloat16")
        with pytest.raises(ConfigError, match="Available on rbln: rbln-w4a16, rbln-w8a16, rbln-w8a8, rbln-fp8"):
            plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048, quantization="awq")

    def test_prefill_chunk_and_seq_buckets(self):
        with pytest.raises(ConfigError, match="rbln_prefill_chunk_size=100: must be a positive multiple of 64"):
            plan_for(smollm2_135m(), batch_size=1, max_seq_len=2048, prefill_chunk_size=100)
        with pytest.raises(ConfigError, match="chunk by chunk"):
            plan_for(smollm2_135m(), batch_size=1, max_seq_len=2048, seq_buckets=[512, 2048])

    def test_unsupported_architecture(self):
        odd = dataclasses.replace(smollm2_135m(), architecture="GPT2LMHeadModel")
        with pytest.raises(ConfigError, match="is not served on rbln by this plugin"):
            plan_for(odd, batch_size=1, max_seq_len=512)


class TestProbe:
    def test_here_no_device(self, monkeypatch):
        monkeypatch.setattr(sdk, "rbln_devices", lambda dev="/dev": [])
        p = plugin.probe({})
        assert p.score == 0
        assert p.reason == ("no RBLN device (/dev/rbln* not found; is the RBLN driver installed and loaded?); "
                            f"{UNVERIFIED}")
        assert "rebel-compiler" in p.hint and "pip install 'llmcore[rbln]'" in p.hint
        assert p.capabilities.device_count == 16 and p.capabilities.memory_bytes == ATOM_BYTES
        assert p.capabilities.quantization == ("rbln-w4a16", "rbln-w8a16", "rbln-w8a8", "rbln-fp8")

    def test_device_without_sdk(self, monkeypatch):
        monkeypatch.setattr(sdk, "rbln_devices", lambda dev="/dev": ["rbln0"])
        monkeypatch.setattr(vendor, "installed_version", lambda d: None)
        p = plugin.probe({})
        assert p.reason == f"RBLN SDK not installed (rebel-compiler, optimum-rbln missing); {UNVERIFIED}"
        assert p.capabilities.device_count == 1

    def test_usable(self, monkeypatch):
        monkeypatch.setattr(sdk, "rbln_devices", lambda dev="/dev": ["rbln0", "rbln1"])
        monkeypatch.setattr(sdk, "missing_sdk", lambda: [])
        monkeypatch.setenv("LLMCORE_RBLN_NPU", "RBLN-CA22")
        p = plugin.probe({})
        assert p.score == plugin.RBLN_SCORE and p.capabilities.device_count == 2
        assert p.description == f"2 RBLN device(s) (RBLN-CA22, ATOM, 15.7 GiB each); {UNVERIFIED}"

    def test_device_nodes_are_matched_exactly(self, tmp_path):
        for name in ("rbln0", "rbln11", "rbln3", "rbln_ctl", "rsd0"):
            (tmp_path / name).touch()
        assert sdk.rbln_devices(str(tmp_path)) == ["rbln0", "rbln3", "rbln11"]

    def test_unknown_npu(self):
        with pytest.raises(ConfigError, match="rbln_npu='RBLN-XX1': is not a known RBLN NPU"):
            plugin.probe({"rbln_npu": "RBLN-XX1"})


def test_device_plan_and_its_description(monkeypatch):
    from llmcore.config import EngineConfig

    monkeypatch.setattr(sdk, "rbln_devices", lambda dev="/dev": [])
    device = plugin.llmcore_create_device(name="rbln", config=EngineConfig(extra={"rbln_npu": "RBLN-CA22"}))
    plan = device.plan(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=4, block_size=2048)
    assert plan.block_size == 2048
    text = device.describe_plan(plan)
    assert "rbln_attn_impl='flash_attn'" in text and "rbln_kvcache_partition_len=2048" in text
    assert "rbln_npu='RBLN-CA22'" in text and "rbln_kvcache_num_blocks=8" in text
    assert device.compile_key_inputs(plan)["compiler_flags"]["npu"] == "RBLN-CA22"
