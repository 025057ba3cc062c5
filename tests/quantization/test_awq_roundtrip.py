"""`llmcore quantize --method awq` writes an AutoAWQ checkpoint that loads back and computes what it says."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmcore import Engine
from llmcore.quantization.awq import Int4Linear
from llmcore.quantization.awq_format import dequantize_awq
from llmcore.quantization.quality import token_nlls

from .conftest import CALIBRATION, PERPLEXITY

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def engine(model, quantization=None):
    return Engine(model=str(model), device="cpu", dtype="float32", quantization=quantization, progress=False,
                  num_kv_blocks=32)


def nlls(e, n=160):
    ids = e.tokenizer.encode(PERPLEXITY.read_text())[:n]
    return torch.tensor(token_nlls(e, ids))


def dequantized_copy(awq_dir, out):
    """The float checkpoint an AWQ checkpoint stands for (quantization_config dropped)."""
    import shutil

    shutil.copytree(awq_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    g = cfg.pop("quantization_config")["group_size"]
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name[: -len(".qweight")]
        tensors[f"{prefix}.weight"] = dequantize_awq(tensors.pop(name), tensors.pop(f"{prefix}.qzeros"),
                                                     tensors.pop(f"{prefix}.scales"), g)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def test_checkpoint_has_autoawq_gemm_layout(awq_tiny, mha_qwen2):
    cfg = json.loads((awq_tiny / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}
    src = json.loads((mha_qwen2 / "config.json").read_text())
    tensors = load_file(str(awq_tiny / "model.safetensors"))
    h, inter = src["hidden_size"], src["intermediate_size"]
    out_in = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    for i in range(src["num_hidden_layers"]):
        for proj in PROJ:
            p = f"model.layers.{i}.{proj}"
            n, k = out_in[proj.split(".")[1]]
            assert f"{p}.weight" not in tensors
            assert (tensors[f"{p}.qweight"].dtype, tuple(tensors[f"{p}.qweight"].shape)) == (torch.int32, (k, n // 8))
            assert (tensors[f"{p}.qzeros"].dtype, tuple(tensors[f"{p}.qzeros"].shape)) == (torch.int32, (k // 128, n // 8))
            assert (tensors[f"{p}.scales"].dtype, tuple(tensors[f"{p}.scales"].shape)) == (torch.float16, (k // 128, n))
    assert "lm_head.weight" not in tensors  # tied embeddings
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16


def test_loaded_awq_computes_exactly_the_dequantized_checkpoint(awq_tiny, tmp_path):
    awq = engine(awq_tiny, "awq")
    fused = awq.runner.model.model.layers[0].self_attn.qkv_proj
    # torch's int4pack layer, or (where the CPU's native decode step runs) the same 4-bit values in
    # the step's layout (llmcore_cpu.native.Q4Linear)
    assert (fused.kernel == "int4pack" if isinstance(fused, Int4Linear) else fused.kernel == "native-4bit")
    assert fused.group_size == 128 and fused.bias is not None
    reference = engine(dequantized_copy(awq_tiny, tmp_path / "deq"))
    assert float((nlls(awq) - nlls(reference)).abs().max()) < 1e-3


def test_awq_round_trip_stays_close_to_the_float_model(awq_tiny, mha_qwen2):
    fp, awq = nlls(engine(mha_qwen2)), nlls(engine(awq_tiny, "awq"))
    # A random model is touchy: 4-bit groups of 128 move each token's NLL (~11 nats) by 0.23 on
    # average here (int8 per channel: 0.02), the mean by 0.05. The real-model bound is in test_quality.
    assert float((awq - fp).abs().mean()) < 0.3
    assert abs(float(awq.mean() - fp.mean())) < 0.1


def test_scale_search_never_loses_to_round_to_nearest(awq_tiny):
    report = json.loads((awq_tiny / "llmcore-quantize.json").read_text())
    groups = report["groups"]
    assert [g["group"] for g in groups[:4]] == ["qkv", "o", "gate_up", "down"]  # MHA: v -> o scaled too
    assert all(g["loss"] <= g["rtn_loss"] for g in groups)
    assert sum(g["loss"] for g in groups) < sum(g["rtn_loss"] for g in groups)
    assert report["calibration_tokens"] > 400 and report["search"] is True


def test_cli_writes_a_checkpoint_the_engine_loads(tiny_llama, tmp_path, capsys):
    from llmcore.cli import quantize

    parser = argparse.ArgumentParser()
    quantize.add_parser(parser.add_subparsers())
    out = tmp_path / "awq"
    args = parser.parse_args(["quantize", "--method", "awq", "--model", str(tiny_llama), "--calibration",
                              str(CALIBRATION), "--output", str(out), "--no-search"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: awq, 4-bit, group size 64" in printed  # hidden size 64: 128 does not divide it
    assert f"llmcore generate --model {out} --quantization awq" in printed
    e = engine(out, "awq")
    assert len(nlls(e, 40)) == 39
    # a second run refuses to overwrite
    with pytest.raises(Exception, match="exists and is not empty"):
        args.func(args)
