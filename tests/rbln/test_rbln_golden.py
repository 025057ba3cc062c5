"""The rbln plugin against rbln_config.json files written by optimum-rbln 0.12.0's own config classes.

tests/rbln/golden/make_golden.py wrote them (RBLN<Arch>ForCausalLMConfig + the model class's
_update_rbln_config, freeze, save); nothing here is a stand-in, so these are real checks of what
the plugin reads, derives and refuses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmcore.compiled.adopt import adopt
from llmcore.cli.main import main as cli_main
from llmcore.errors import ConfigError
from llmcore.models.config import ModelConfig
from llmcore_rbln import planning

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> tuple[dict, ModelConfig]:
    return json.loads((GOLDEN / name / "rbln_config.json").read_text()), ModelConfig.from_path(GOLDEN / name)


@pytest.fixture(autouse=True)
def no_npu_env(monkeypatch):
    monkeypatch.delenv("LLMCORE_RBLN_NPU", raising=False)


def test_sdk_saves_num_devices_only_inside_compile_cfgs():
    cfg, _ = golden("llama_b4_s4096_tp4")
    assert "num_devices" not in cfg and "npu" not in cfg
    assert planning.saved_devices(cfg) == (4, "RBLN-CA25")


def test_batch4_len4096_four_devices_reconciles_cleanly():
    cfg, mc = golden("llama_b4_s4096_tp4")
    plan = planning.plan_for(mc, batch_size=4, max_seq_len=4096, tensor_parallel=4, dtype="float16",
                             batch_buckets=[1, 2, 4])
    planning.reconcile_artifact(cfg, plan, "RBLN-CA25")  # no error
    assert planning.plan_from_artifact(cfg, mc) == plan


def test_a_tensor_parallel_mismatch_names_both_values():
    cfg, mc = golden("llama_b4_s4096_tp4")
    plan = planning.plan_for(mc, batch_size=4, max_seq_len=4096, tensor_parallel=2, dtype="float16",
                             batch_buckets=[1, 2, 4])
    with pytest.raises(ConfigError, match=r"num_devices: rbln_config.json has 4, the plan has 2"):
        planning.reconcile_artifact(cfg, plan, "RBLN-CA25")


def test_flash_attention_artifact_reconciles():
    cfg, mc = golden("llama_b2_s8192_flash")
    plan = planning.plan_from_artifact(cfg, mc)
    assert (plan.block_size, plan.batch_buckets, plan.tensor_parallel) == (4096, (1, 2), 1)
    planning.reconcile_artifact(cfg, plan, "RBLN-CA25")


def test_quantized_artifact_is_float32_and_its_plan_sizes_kv_at_four_bytes():
    cfg, mc = golden("llama_b1_s2048_w4a16")
    assert cfg["dtype"] == "float32"
    plan = planning.plan_from_artifact(cfg, mc)
    assert (plan.quantization, plan.dtype) == ("rbln-w4a16", "float32")
    assert plan.kv_bytes_per_core == 2048 * mc.kv_bytes_per_token(4)
    planning.reconcile_artifact(cfg, plan, "RBLN-CA25")


@pytest.mark.parametrize("name", ["llama_b4_s4096_tp4", "llama_b2_s8192_flash", "llama_b1_s2048_w4a16",
                                  "mistral_sliding_window"])
def test_cache_impl_is_derived_as_the_sdk_derives_it(name):
    cfg, mc = golden(name)
    assert planning.sdk_cache_impl(mc.raw) == cfg["cache_impl"]


def test_mistral_with_a_sliding_window_is_refused_clearly():
    cfg, mc = golden("mistral_sliding_window")
    assert cfg["cache_impl"] == "sliding_window"
    with pytest.raises(ConfigError, match=r"sliding_window=4096 and use_sliding_window=None: optimum-rbln compiles "
                                          r"it with a sliding-window KV cache .* Set \"use_sliding_window\": false"):
        planning.plan_for(mc, batch_size=1, max_seq_len=4096)


def test_use_sliding_window_false_compiles_a_static_cache():
    _, mc = golden("mistral_sliding_window")
    mc.raw["use_sliding_window"] = False
    assert planning.sdk_cache_impl(mc.raw) == "static"
    assert planning.plan_for(mc, batch_size=1, max_seq_len=4096).block_size == 4096


def test_cache_import_check_copies_nothing(tmp_path, capsys):
    code = cli_main(["cache", "import", str(GOLDEN / "llama_b4_s4096_tp4"), "--check", "--cache-dir",
                     str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "batch slots       4 (decode buckets [1, 2, 4])" in out and "tensor parallel   4" in out
    assert "nothing copied" in out and not list(tmp_path.glob("*/manifest.json"))


def test_cache_import_refuses_a_mismatched_max_model_len(tmp_path, capsys):
    code = cli_main(["cache", "import", str(GOLDEN / "llama_b4_s4096_tp4"), "--device", "rbln",
                     "--max-model-len", "2048", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "max_model_len: requested 2048, compiled max_seq_len 4096" in err


def test_cache_import_refuses_the_wrong_device(tmp_path, capsys):
    code = cli_main(["cache", "import", str(GOLDEN / "llama_b4_s4096_tp4"), "--device", "neuron", "--check"])
    assert code == 2 and "device='neuron': did not write" in capsys.readouterr().err


def test_imported_directory_is_a_cache_entry_with_the_sdk_files(tmp_path):
    from compile_cache import CompileCache

    src = tmp_path / "vendor"
    shutil.copytree(GOLDEN / "llama_b2_s8192_flash", src)
    cache = CompileCache(tmp_path / "cache")
    done = adopt(src, cache=cache)
    entry = cache.resolve(done.entry.digest)
    assert {"rbln_config.json", "prefill.rbln", "decoder_batch_1.rbln", "decoder_batch_2.rbln"} <= set(entry.files)
    assert entry.metadata["plan"]["batch_buckets"] == [1, 2]
    assert entry.metadata["adopted_from"] == str(src.resolve())
    assert adopt(src, cache=cache).entry.digest == done.entry.digest, "importing again is a cache hit"
