"""The command line, run in-process through its main()."""

from __future__ import annotations

import json
import subprocess
import sys

from llmcore.cli.main import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert "llmcore 0.1.0" in capsys.readouterr().out


def test_devices_table_and_json(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu", "cuda", "neuron", "rbln"):
        assert name in out
    assert "default device: cpu" in out and "cannot run here" in out
    assert main(["devices", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["default"] == "cpu"
    assert {d["name"] for d in info["devices"]} >= {"cpu", "cuda", "neuron", "rbln"}
    neuron = next(d for d in info["devices"] if d["name"] == "neuron")
    assert neuron["capabilities"]["kv_layout"] == "fixed-slots" and neuron["capabilities"]["needs_compile"]


def test_generate_file_json(tmp_path, tiny_llama, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("hello there\n\nhow are you\n")
    code = main(["generate", "--model", str(tiny_llama), "--file", str(f), "--json", "--no-chat",
                 "--max-tokens", "5", "--ignore-eos", "--dtype", "float32", "--no-progress"])
    assert code == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["prompt"] for l in lines] == ["hello there", "how are you"]
    assert all(len(l["outputs"][0]["token_ids"]) == 5 for l in lines)


def test_generate_default_model_chat_stream(capsys):
    code = main(["generate", "What is the capital of France?", "--stream", "--no-progress",
                 "--dtype", "float32", "--max-tokens", "20"])
    assert code == 0
    assert "Paris" in capsys.readouterr().out


def test_errors_exit_2_with_message(tiny_llama, capsys):
    assert main(["generate", "hi", "--device", "tpu", "--model", str(tiny_llama), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "device='tpu'" in err and "Known devices" in err
    assert main(["generate", "--model", str(tiny_llama), "--no-progress"]) == 2
    assert "prompt" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "llmcore.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "llmcore devices" in out.stdout and "LLMCORE_DISABLE_PLUGINS" in out.stdout
