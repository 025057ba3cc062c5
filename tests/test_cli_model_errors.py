"""A folder llmcore cannot serve gets one line that says why and what would work."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import save_file

from llmcore.cli.main import main

GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_head": 4,
               "n_layer": 2, "n_positions": 128, "vocab_size": 1000}


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_CONFIG))
    save_file({"transformer.wte.weight": torch.zeros(1000, 64)}, tmp_path / "model.safetensors")
    assert main(["generate", "--model", str(tmp_path), "--no-progress", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: architecture 'GPT2LMHeadModel' (model_type 'gpt2') is not supported; supported: "
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, and those a device plugin "
        "adds (llmcore devices lists the plugins)"]


def test_supported_architecture_missing_a_field_names_the_field(tmp_path, tiny_llama, capsys):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(tiny_llama / "model.safetensors")
    assert main(["generate", "--model", str(tmp_path), "--no-progress", "hi"]) == 2
    assert capsys.readouterr().err == (
        "error: config.json has no 'num_hidden_layers', which a LlamaForCausalLM model needs\n")


def test_folder_without_tokenizer_says_which_files_are_needed(tmp_path, tiny_llama, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in tiny_llama.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, folder / f.name)
    assert main(["generate", "--model", str(folder), "--no-progress", "--device", "cpu", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no usable tokenizer in {folder}: ")
    assert "needs the tokenizer files of its Hugging Face repository: tokenizer.json" in err
    assert err.rstrip().endswith("copy them next to config.json")
