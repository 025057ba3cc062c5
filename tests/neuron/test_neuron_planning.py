"""Neuron planning and probing, for real: no stand-in is needed to size a plan or read /dev."""

from __future__ import annotations

import pytest

from llmcore.compiled import vendor
from llmcore.compiled.vendor import UNVERIFIED
from llmcore.errors import ConfigError
from llmcore.testing.configs import llama2_7b, smollm2_135m
from llmcore_neuron import plugin, sdk
from llmcore_neuron.planning import padded_heads, plan_for

GIB = 2**30


@pytest.fixture(autouse=True)
def no_target_env(monkeypatch):
    monkeypatch.delenv("LLMCORE_NEURON_TARGET", raising=False)
    monkeypatch.setattr(sdk, "instance_family", lambda: None)


class TestLlama2On16GiBCores:
    """Llama-2-7B, bf16, 4 slots of 4096 tokens: 12.55 GiB of weights, 8 GiB of KV in total."""

    def test_tp2_fits_with_the_exact_per_core_estimate(self):
        plan = plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=2)
        assert plan.weight_bytes_per_core == 6_738_415_616  # 6.74e9 params * 2 bytes / 2 cores
        assert plan.kv_bytes_per_core == 4 * GIB  # 4 * 4096 tokens * 512 KiB / 2 cores
        assert plan.memory_per_core == 12_136_721_203  # (weights + KV) * 1.10
        assert plan.memory_limit == 16 * GIB
        assert (plan.batch_buckets, plan.seq_buckets, plan.block_size) == ((4,), (4096,), None)
        assert "memory per core   11.30 GiB (weights 6.28 + KV 4.00 + 10% overhead) of 16 GiB" in plan.describe()

    def test_tp8_quarters_it(self):
        plan = plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=8)
        assert (plan.weight_bytes_per_core, plan.kv_bytes_per_core) == (1_684_603_904, GIB)
        assert plan.memory_per_core == 3_034_180_300
        assert "2.83 GiB" in plan.describe()

    def test_tp1_does_not_fit_and_says_what_would(self):
        with pytest.raises(ConfigError) as err:
            plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=1)
        msg = str(err.value)
        assert "needs ~22.6 GiB per core" in msg and "more than neuron's 16 GiB" in msg
        assert "Raise --tensor-parallel" in msg

    def test_tp2_with_16_slots_does_not_fit(self):
        with pytest.raises(ConfigError, match=r"needs ~24.5 GiB per core \(weights 6.3 \+ KV 16.0"):
            plan_for(llama2_7b(), batch_size=16, max_seq_len=4096, tensor_parallel=2)

    def test_tp_that_does_not_divide_the_heads_is_padded_as_the_sdk_does(self):
        # optimum-neuron pads 32 heads to 33 for 3 cores (gqa.get_shardable_head_counts)
        plan = plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=3)
        assert plan.tensor_parallel == 3
        assert padded_heads(32, 3) == 33 and padded_heads(64, 24) == 72 and padded_heads(32, 8) == 32

    def test_sequence_length_is_capped_by_the_model(self):
        with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings \\(4096\\)"):
            plan_for(llama2_7b(), batch_size=1, max_seq_len=8192, tensor_parallel=8)

    def test_trn2_cores_have_24_gib(self):
        plan = plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=1, target="trn2")
        assert plan.memory_limit == 24 * GIB and plan.memory_per_core < 24 * GIB

    def test_more_cores_than_the_instance_has_is_refused(self):
        with pytest.raises(ConfigError, match="exceeds the 4 cores/devices neuron reports"):
            plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=8, num_cores=4)


class TestSmolLM2:
    def test_bf16_plan(self):
        plan = plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048)
        assert plan.dtype == "bfloat16" and plan.tensor_parallel == 1
        assert plan.weight_bytes_per_core == 269_030_016  # 134.5M params, tied embeddings counted once
        assert plan.kv_bytes_per_core == 4 * 2048 * 2 * 30 * 3 * 64 * 2

    def test_nine_heads_allow_tp2_by_padding_to_ten(self):
        assert plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048, tensor_parallel=2).tensor_parallel == 2
        assert padded_heads(9, 2) == 10

    def test_no_quantization_on_neuron(self):
        with pytest.raises(ConfigError, match="quantization='awq': is not available on neuron. Available on neuron: none"):
            plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048, quantization="awq")

    @pytest.mark.parametrize("option,value,match", [
        ("batch_buckets", [1, 2, 4], "one decode graph for all batch_size slots"),
        ("seq_buckets", [512, 2048], "no prefill buckets or chunked prefill"),
        ("block_size", 16, "no KV block size"),
    ])
    def test_shapes_neuron_cannot_compile_are_refused(self, option, value, match):
        with pytest.raises(ConfigError, match=match):
            plan_for(smollm2_135m(), batch_size=4, max_seq_len=2048, **{option: value})

    def test_dtype_aliases_and_unknown_dtypes(self):
        assert plan_for(smollm2_135m(), batch_size=1, max_seq_len=512, dtype="fp16").dtype == "float16"
        with pytest.raises(ConfigError, match="is not a known dtype"):
            plan_for(smollm2_135m(), batch_size=1, max_seq_len=512, dtype="int8")


class TestProbe:
    def test_here_no_device_and_it_says_so(self, monkeypatch):
        monkeypatch.setattr(sdk, "neuron_devices", lambda dev="/dev": [])
        p = plugin.probe({})
        assert (p.name, p.score, p.reason) == ("neuron", 0, f"no Neuron device (/dev/neuron* not found); {UNVERIFIED}")
        assert "pip install 'llmcore[neuron]'" in p.hint and "pip.repos.neuron.amazonaws.com" in p.hint
        caps = p.capabilities
        assert caps.device_count == 24 and caps.memory_bytes == 16 * GIB
        assert any("inf2.48xlarge" in n for n in caps.notes)

    def test_device_without_runtime(self, monkeypatch):
        monkeypatch.setattr(sdk, "neuron_devices", lambda dev="/dev": ["neuron0"])
        monkeypatch.setattr(sdk, "runtime_library", lambda: None)
        p = plugin.probe({})
        assert p.score == 0 and p.reason == f"Neuron runtime library not found (/opt/aws/neuron/lib/libnrt.so.1); {UNVERIFIED}"

    def test_device_and_runtime_without_sdk(self, monkeypatch):
        monkeypatch.setattr(sdk, "neuron_devices", lambda dev="/dev": ["neuron0"])
        monkeypatch.setattr(sdk, "runtime_library", lambda: "/opt/aws/neuron/lib/libnrt.so.1")
        monkeypatch.setattr(vendor, "installed_version", lambda d: None)  # whatever this machine has
        p = plugin.probe({})
        assert p.score == 0
        assert p.reason == ("Neuron SDK not installed (optimum-neuron, torch-neuronx, neuronx-cc, neuronx-distributed "
                            f"missing); {UNVERIFIED}")

    def test_usable_inf2_counts_two_cores_per_device(self, monkeypatch):
        monkeypatch.setattr(sdk, "neuron_devices", lambda dev="/dev": ["neuron0", "neuron1"])
        monkeypatch.setattr(sdk, "runtime_library", lambda: "/opt/aws/neuron/lib/libnrt.so.1")
        monkeypatch.setattr(sdk, "missing_sdk", lambda: [])
        monkeypatch.setattr(sdk, "instance_family", lambda: "inf2")
        p = plugin.probe({})
        assert p.score == plugin.NEURON_SCORE and p.capabilities.device_count == 4
        assert p.description == f"2 Neuron device(s), 4 NeuronCores (inf2, 16 GiB each); {UNVERIFIED}"

    def test_device_nodes_are_matched_exactly(self, tmp_path):
        for name in ("neuron0", "neuron10", "neuron2", "neuron_monitor", "nvidia0"):
            (tmp_path / name).touch()
        assert sdk.neuron_devices(str(tmp_path)) == ["neuron0", "neuron2", "neuron10"]

    def test_unknown_target_is_a_clear_error(self):
        with pytest.raises(ConfigError, match="neuron_target='inf9': is not a Neuron instance family. Use one of: inf2, trn1, trn2"):
            plugin.probe({"neuron_target": "inf9"})

    def test_capabilities_describe_a_static_compiled_device(self):
        caps = plugin.capabilities("inf2", 2)
        assert caps.dtypes == ("bfloat16", "float16", "float32") and caps.default_dtype == "bfloat16"
        assert caps.quantization == () and caps.kv_layout == "fixed-slots"
        assert caps.needs_compile and caps.static_shapes and caps.tensor_parallel
        assert (caps.device_count, caps.memory_bytes) == (2, 16 * GIB)


def test_device_plan_and_its_description(monkeypatch):
    from llmcore.config import EngineConfig

    monkeypatch.setattr(sdk, "neuron_devices", lambda dev="/dev": [])
    device = plugin.llmcore_create_device(name="neuron", config=EngineConfig(extra={"neuron_target": "trn1"}))
    plan = device.plan(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=2)
    assert plan == plan_for(llama2_7b(), batch_size=4, max_seq_len=4096, tensor_parallel=2, target="trn1")
    text = device.describe_plan(plan)
    assert text.startswith(plan.describe())
    assert "neuron target     trn1" in text and "continuous_batching=True, on_device_sampling=False" in text
    assert device.compile_key_inputs(plan)["compiler_flags"]["target"] == "trn1"
