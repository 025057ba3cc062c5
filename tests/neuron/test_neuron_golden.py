"""The neuron plugin against neuron_config.json files written by optimum-neuron 0.4.5's NxDNeuronConfig.

tests/neuron/golden/make_golden.py wrote them with the SDK's own class and save_pretrained; these
tests check what the plugin reads from them, with no stand-in involved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmcore.cli.main import main as cli_main
from llmcore.errors import ConfigError
from llmcore.models.config import ModelConfig
from llmcore_neuron import planning, sdk

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> tuple[dict, ModelConfig]:
    return json.loads((GOLDEN / name / "neuron_config.json").read_text()), ModelConfig.from_path(GOLDEN / name)


@pytest.fixture(autouse=True)
def no_target_env(monkeypatch):
    monkeypatch.delenv("LLMCORE_NEURON_TARGET", raising=False)
    monkeypatch.setattr(sdk, "instance_family", lambda: None)


def test_host_sampling_export_reconciles_with_its_plan():
    nc, mc = golden("llama_b4_s4096_tp2")
    plan = planning.plan_for(mc, batch_size=4, max_seq_len=4096, tensor_parallel=2, dtype="bfloat16")
    planning.reconcile_artifact(nc, plan)  # no error
    assert planning.plan_from_artifact(nc, mc, "inf2") == plan


def test_a_batch_mismatch_names_both_values():
    nc, mc = golden("llama_b4_s4096_tp2")
    plan = planning.plan_for(mc, batch_size=2, max_seq_len=4096, tensor_parallel=2, dtype="bfloat16")
    with pytest.raises(ConfigError, match="batch_size: neuron_config.json has 4, the plan has 2"):
        planning.reconcile_artifact(nc, plan)


def test_hub_cache_style_export_pads_64_heads_over_24_cores_and_samples_on_device():
    nc, mc = golden("llama_b1_s4096_tp24_ods")
    assert (mc.num_heads, nc["tp_degree"], nc["on_device_sampling"]) == (64, 24, True)
    plan = planning.plan_from_artifact(nc, mc, "inf2")
    assert plan.tensor_parallel == 24 and planning.padded_heads(64, 24) == 72
    planning.reconcile_artifact(nc, plan, on_device_sampling=True)
    with pytest.raises(ConfigError, match="on_device_sampling: neuron_config.json has True, the plan has False"):
        planning.reconcile_artifact(nc, plan)


def test_a_trn2_target_refuses_an_inf2_export():
    nc, mc = golden("llama_b4_s4096_tp2")
    with pytest.raises(ConfigError, match="neuron_target='trn2': compiles for trn2, but neuron_config.json has "
                                          "target 'trn1'"):
        planning.plan_from_artifact(nc, mc, "trn2")


def test_cache_import_check_reads_the_sdk_file(capsys):
    code = cli_main(["cache", "import", str(GOLDEN / "llama_b1_s4096_tp24_ods"), "--check"])
    out = capsys.readouterr().out
    assert code == 0 and "tensor parallel   24" in out and "nothing copied" in out


def test_cache_import_refuses_a_mismatched_max_num_seqs(capsys):
    code = cli_main(["cache", "import", str(GOLDEN / "llama_b4_s4096_tp2"), "--max-num-seqs", "8", "--check"])
    assert code == 2 and "max_num_seqs: requested 8, compiled batch_size 4" in capsys.readouterr().err
