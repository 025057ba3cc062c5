"""``llmcore generate``: samples printed in turn while streaming, JSON lines with --stream, a missing --file."""

from __future__ import annotations

import io
import json

from llmcore.cli.commands import SamplePrinter
from llmcore.cli.main import main
from llmcore.outputs import StreamDelta


def _run(capsys, tiny_llama, *extra: str) -> str:
    code = main(["generate", "--model", str(tiny_llama), "--no-chat", "--no-progress", "--dtype", "float32",
                 "--max-tokens", "6", "--ignore-eos", "--n", "2", "--temperature", "1.0", "--seed", "3",
                 "hello there", *extra])
    assert code == 0
    return capsys.readouterr().out


def test_stream_with_n_prints_each_sample_in_turn_as_without_stream(tiny_llama, capsys):
    whole = _run(capsys, tiny_llama)
    streamed = _run(capsys, tiny_llama, "--stream")
    assert whole.startswith("--- sample 0\n") and "\n--- sample 1\n" in whole
    samples = whole.split("--- sample 1\n")
    assert samples[0] != "--- sample 0\n" + samples[1]  # two different samples, so an interleaving would show
    assert streamed == whole


def test_sample_printer_holds_later_samples_until_their_turn():
    out = io.StringIO()
    p = SamplePrinter(3, out)
    for index, text, finish in [(0, "a", None), (1, "X", None), (2, "p", None), (1, "Y", "length"),
                                (0, "b", "length"), (2, "q", None), (2, "r", "stop")]:
        p.add(StreamDelta("r", index, text, [1], finish))
    p.close()
    assert out.getvalue() == "--- sample 0\nab\n--- sample 1\nXY\n--- sample 2\npqr\n"


def test_stream_json_emits_json_lines_that_add_up_to_the_outputs(tiny_llama, capsys):
    whole = json.loads(_run(capsys, tiny_llama, "--json"))
    lines = [json.loads(line) for line in _run(capsys, tiny_llama, "--json", "--stream").splitlines()]
    assert {tuple(sorted(line)) for line in lines} == {("finish_reason", "index", "prompt", "text", "token_ids")}
    for o_index, o in enumerate(whole["outputs"]):
        mine = [line for line in lines if line["index"] == o_index]
        assert "".join(line["text"] for line in mine) == o["text"]
        assert sum((line["token_ids"] for line in mine), []) == o["token_ids"]
        assert [line["finish_reason"] for line in mine][-1] == o["finish_reason"] == "length"


def test_missing_prompt_file_is_one_line_and_exit_2(capsys):
    assert main(["generate", "-f", "/nonexistent.txt", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --file='/nonexistent.txt': does not exist. Give a text file with one prompt per line\n"


def test_stdin_and_empty_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["generate", "-f", str(empty), "--no-progress"]) == 2
    assert "contains no prompts" in capsys.readouterr().err
    assert main(["generate", "-f", str(tmp_path), "--no-progress"]) == 2  # a folder
    assert capsys.readouterr().err.startswith(f"error: --file='{tmp_path}': cannot be read (")
