"""What every ``llmcore`` verb shares: the engine options, their conversion to ``Engine`` keyword
arguments, the logging set-up, and commands loaded only when they run.

``generate``, ``serve`` and ``batch`` declare their model and engine options here, once, with
the same names, checks and help; :func:`engine_kwargs` is the one converter. Options left unset
stay ``None`` and are not passed, so the engine's defaults (or a compiled artifact's settings, or
a server config file's per-model settings) stand.

Nothing here imports torch or a web framework: ``llmcore --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, Callable

LOG_LEVELS = ("debug", "info", "warning", "error")


# ------------------------------------------------------------------ value checks


def _number(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    v = _number(text, int, "an integer")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def nonneg_int(text: str) -> int:
    v = _number(text, int, "an integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def seconds(text: str) -> float | None:
    """A duration in seconds; ``none``, ``off`` or ``0`` mean no limit."""
    if text.lower() in ("none", "0", "off"):
        return None
    v = _number(text, float, "a number of seconds")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 (or 'none')")
    return v


def gib(text: str) -> float:
    v = _number(text, float, "a number of GiB")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


# ------------------------------------------------------------------ engine options


def add_engine_options(p: argparse.ArgumentParser, *, several_models: bool = False,
                       served_name: bool = False) -> None:
    """``--model`` and the engine options, for any verb.

    :param several_models: ``--model`` may repeat (``llmcore serve``).
    :param served_name: add ``--served-model-name`` (one per ``--model``).
    """
    g = p.add_argument_group("model and engine")
    if several_models:
        g.add_argument("--model", "-m", action="append", default=None, metavar="M",
                       help="local Hugging Face folder (config.json + *.safetensors) or .gguf file; repeat to "
                            "serve several. Default (no --model and no --config): the embedded "
                            "SmolLM2-135M-Instruct")
    else:
        g.add_argument("--model", "-m", default=None, metavar="M",
                       help="local Hugging Face folder (config.json + *.safetensors) or .gguf file; "
                            "default: the embedded SmolLM2-135M-Instruct")
    if served_name and several_models:
        g.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                       help="name clients use in \"model\"; one per --model, in order "
                            "(default: the folder name, or SmolLM2-135M-Instruct)")
    elif served_name:
        g.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="model name written into the responses (default: the folder name)")
    g.add_argument("--device", "-d", default=None, metavar="D",
                   help="device name (cpu, cuda, neuron, rbln, or a third-party plugin's); default: the "
                        "highest-scoring usable device (see 'llmcore devices')")
    g.add_argument("--dtype", default=None, metavar="T",
                   help="auto (the device's default), float32, bfloat16 or float16. Use float32 to match "
                        "Hugging Face greedy output exactly")
    g.add_argument("--quantization", "-q", default=None, help="weight quantization method, if the device offers it")
    g.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                   help="longest prompt + output, in tokens (default: the model's)")
    g.add_argument("--max-num-seqs", type=positive_int, default=None, metavar="N",
                   help="sequences decoded at once (default 64)")
    g.add_argument("--block-size", type=positive_int, default=None, metavar="N",
                   help="KV-cache block size in tokens (default: the device's; 8 on the CPU, 16 on CUDA)")
    g.add_argument("--kv-cache-memory", type=gib, default=None, metavar="GIB",
                   help="GiB for the KV cache (default: the device decides, 2 GiB on CPU)")
    g.add_argument("--no-prefix-caching", action="store_true", default=None, help="disable prefix caching")
    g.add_argument("--compiled", default=None,
                   help="serve a compiled artifact: a compile-cache key (prefix) or entry path from 'llmcore compile'")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads (default: the device decides; on a busy machine 1 can be much faster)")
    g.add_argument("--tensor-parallel", type=positive_int, default=None, metavar="N",
                   help="shard the model over N GPUs, one process per GPU (default 1; see docs/parallel.md)")
    # removed with the CPU's Inductor-compiled decode step: accepted so old command lines still run
    # (the CPU device warns that it is ignored)
    g.add_argument("--compile-decode", action="store_true", default=None, help=argparse.SUPPRESS)
    g.add_argument("--no-native-decode", action="store_true", default=None,
                   help="CPU: decode with torch ops instead of the native C++ step (built with g++ at first use, "
                        "~2 s; used by default where it covers the model, see docs/cpu.md)")


def add_engine_seed(p: argparse.ArgumentParser) -> None:
    """``--seed`` as the engine's RNG seed (``serve``, ``batch``; ``generate``'s is per request)."""
    p.add_argument("--seed", dest="engine_seed", type=int, default=None,
                   help="engine RNG seed for requests without a seed")


# option dest -> Engine keyword, for the options passed through unchanged
_PASS_THROUGH = (("device", "device"), ("dtype", "dtype"), ("quantization", "quantization"),
                 ("max_model_len", "max_model_len"), ("max_num_seqs", "max_num_seqs"),
                 ("block_size", "block_size"), ("compiled", "compiled"), ("threads", "num_threads"),
                 ("engine_seed", "seed"), ("tensor_parallel", "tensor_parallel_size"))


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Engine`` keyword arguments the options set (``--model`` excluded: callers place it)."""
    kw: dict[str, Any] = {}
    for dest, name in _PASS_THROUGH:
        v = getattr(args, dest, None)
        if v is not None:
            kw[name] = v
    if getattr(args, "kv_cache_memory", None):
        kw["kv_cache_memory"] = int(args.kv_cache_memory * 2**30)
    if getattr(args, "compile_decode", None):
        kw["compile_decode"] = True
    if getattr(args, "no_native_decode", None):
        kw["native_decode"] = False
    if getattr(args, "no_prefix_caching", None):
        kw["enable_prefix_caching"] = False
    return kw


# ------------------------------------------------------------------ logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "ts": round(record.created, 3), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        })


def setup_logging(level: str | None, fmt: str = "text") -> None:
    """The one logging set-up of every verb (and of each Ray Serve replica): ``llmcore.*`` loggers to stderr.

    :param level: debug, info, warning or error; ``None`` = ``$LLMCORE_LOG_LEVEL``, else warning.
    :param fmt: ``text`` or ``json`` (one JSON object per line).
    """
    name = (level or os.environ.get("LLMCORE_LOG_LEVEL") or "warning").upper()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("llmcore")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, name, logging.WARNING))
    root.propagate = False


# ------------------------------------------------------------------ commands loaded when they run


def lazy_command(target: str, extra: str | None = None) -> Callable[[argparse.Namespace], int]:
    """A command function named ``"package.module:function"``, imported only when the command runs.

    The parsers of every verb load at each ``llmcore`` start; their bodies pull in torch (and the
    server's FastAPI), so they are imported here, by name, when chosen. With ``extra``, a missing
    optional dependency is one line naming the extra to install.
    """
    module, func = target.split(":")

    def run(args: argparse.Namespace) -> int:
        try:
            fn = getattr(importlib.import_module(module), func)
        except ImportError as exc:
            if extra is None or (exc.name or "").startswith("llmcore"):
                raise
            verb = getattr(args, "command", None) or func.removesuffix("_command")
            print(f"llmcore {verb}: error: {exc}. Install the {extra} extras: pip install 'llmcore[{extra}]'",
                  file=sys.stderr)
            return 2
        return fn(args)

    run.__qualname__ = run.__name__ = func
    return run
