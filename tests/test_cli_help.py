"""Every command's --help ends with examples (docs/cli.md promises it)."""

from __future__ import annotations

import argparse

import pytest

from llmcore.cli.main import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_is_known():
    assert set(_commands()) == {"devices", "generate", "bench", "compile", "cache", "serve", "batch", "quantize", "repo"}


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_has_examples(name):
    text = _commands()[name].format_help()
    assert "\nexamples:\n  llmcore " in text, text[-800:]
    examples = text.split("\nexamples:\n", 1)[1]
    assert f"llmcore {name}" in examples
