"""``--tool-call-parser`` and the config file's per-model ``tool_call_parser``."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml

from llmcore.errors import ConfigError
from llmcore.server.cli import add_serve_parser
from llmcore.server.settings import build_serve_config, load_config


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_flag_sets_models_without_their_own_parser(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"models": [
        {"name": "a", "model": None, "tool_call_parser": "hermes"},
        {"name": "b", "model": None},
    ]}))
    assert [m.tool_call_parser for m in load_config(path).models] == ["hermes", None]
    cfg = build_serve_config(_args("--config", str(path), "--tool-call-parser", "mistral"))
    assert [m.tool_call_parser for m in cfg.models] == ["hermes", "mistral"]
    assert build_serve_config(_args("--tool-call-parser", "llama3_json")).models[0].tool_call_parser == "llama3_json"


def test_unknown_parser_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "a", "model": None, "tool_call_parser": "qwen"}]}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: models[0].tool_call_parser='qwen': is not a known "
                                                    "tool call parser. Use one of: hermes, llama3_json, mistral")):
        load_config(path)


def test_unknown_parser_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _args("--tool-call-parser", "qwen")
    assert exc.value.code == 2
    assert "--tool-call-parser: invalid choice: 'qwen'" in capsys.readouterr().err
