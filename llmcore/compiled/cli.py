"""``llmcore compile``: print the plan, compile into the cache, print the key and path.

Wired into the main CLI with :func:`add_compile_parser`; also runs on its own:
``python -m llmcore.compiled.cli --device cpu --batch-size 4 --max-seq-len 256``.

Exit status: 0 compiled, cache hit or dry run; 1 compile failed; 2 invalid
settings (the message names the option and what would work); 3 the device
cannot run here (the probe's reason and hint are printed; ``--dry-run``
still prints its plan).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from compile_cache import CacheError, CompileCache
from compile_cache.cli import add_cache_parser as add_store_commands

from llmcore.compiled.adopt import adopt
from llmcore.compiled.build import CompileRequest, plan_compile, run_compile
from llmcore.errors import ConfigError, DeviceUnavailableError, LlmcoreError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", required=True,
                   help="device to compile for: cpu, cuda, neuron, rbln or a plugin's device")
    p.add_argument("--model", default=None,
                   help="Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, required=True, help="batch slots (sequences served at once)")
    p.add_argument("--max-seq-len", type=int, required=True, help="longest sequence (prompt + output)")
    p.add_argument("--dtype", default="auto", help="auto (the device's default), float32, bfloat16, float16")
    p.add_argument("--quantization", default=None, help="quantization method, if the device offers one")
    p.add_argument("--tensor-parallel", type=int, default=1, help="cores/devices to shard the model over")
    p.add_argument("--buckets", "--decoder-batch-sizes", dest="buckets", type=_int_list, default=None,
                   help="decode batch buckets, e.g. 1,2,4 (default: powers of two up to --batch-size; "
                        "rbln: its decoder_batch_sizes, default --batch-size only)")
    p.add_argument("--seq-buckets", type=_int_list, default=None,
                   help="prefill length buckets, e.g. 64,256 (default: --max-seq-len only)")
    p.add_argument("--block-size", type=int, default=None, help="KV block size, where the device pages its KV")
    g = p.add_argument_group("device settings (neuron, rbln)")
    g.add_argument("--neuron-target", default=None, choices=["inf2", "trn1", "trn2"],
                   help="neuron: instance family to compile for (default: $LLMCORE_NEURON_TARGET, this "
                        "instance, else inf2)")
    g.add_argument("--on-device-sampling", action="store_true", default=None,
                   help="neuron: sample on the NeuronCores (top-k/top-p/temperature only, as optimum-neuron's "
                        "hub cache compiles it); default: logits to the host, every sampling option")
    g.add_argument("--rbln-npu", default=None,
                   help="rbln: target NPU, e.g. RBLN-CA25 (default: $LLMCORE_RBLN_NPU, the card here, else RBLN-CA25)")
    g.add_argument("--prefill-chunk-size", type=int, default=None,
                   help="rbln: prompt tokens per prefill step, a multiple of 64 (default: 128 on ATOM, 512 on REBEL)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the cache key; compile nothing")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $LLMCORE_CACHE_DIR or ~/.cache)")
    p.add_argument("--shared-cache-dir", default=None,
                   help="read-only shared cache checked on a miss (default: $LLMCORE_SHARED_CACHE_DIR)")
    p.add_argument("--lock-timeout", type=float, default=None,
                   help="seconds to wait for another process compiling the same key (default: forever)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run_compile_command)
    return p


EXAMPLES = """\
examples:
  llmcore compile --device cpu --batch-size 4 --max-seq-len 1024 --dtype float32
  llmcore compile --device neuron --model ./Llama-3.2-1B --batch-size 4 --max-seq-len 4096 --dry-run
  llmcore compile --device neuron --neuron-target trn1 --tensor-parallel 24 --batch-size 8 --max-seq-len 4096
  llmcore compile --device rbln --rbln-npu RBLN-CA22 --batch-size 4 --max-seq-len 8192 --prefill-chunk-size 128
  llmcore generate --compiled KEY "Hello"          # serve what was compiled (KEY: printed above)
"""


def device_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The device options given on the command line, as ``EngineConfig.extra`` keys."""
    given = {
        "neuron_target": args.neuron_target,
        "neuron_on_device_sampling": args.on_device_sampling,
        "rbln_npu": args.rbln_npu,
        "rbln_prefill_chunk_size": args.prefill_chunk_size,
    }
    return {k: v for k, v in given.items() if v is not None}


def add_compile_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compile`` to the main CLI's subparsers; ``args.func(args)`` returns the exit status."""
    p = subparsers.add_parser(
        "compile", help="ahead-of-time compile a model for fixed shapes into the compile cache",
        description="Plan static shapes for a device, compile the model for them and store the "
                    "artifact in the compile cache. Serve it with Engine(compiled=KEY) or "
                    "llmcore generate --compiled KEY.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return configure_parser(p)


def add_cache_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``llmcore cache``: the store's commands (ls, verify, prune, rm) and ``import``."""
    p = add_store_commands(subparsers)
    imp = p.commands.add_parser(
        "import", help="adopt a directory compiled by optimum-rbln / optimum-neuron save_pretrained",
        description="Read the settings a vendor-compiled directory was built with from its own config file "
                    "(rbln_config.json, neuron_config.json), check them against the options given here "
                    "(each difference names both values) and store the directory in the compile cache, "
                    "keyed like an entry `llmcore compile` made. Serve it with --compiled KEY.")
    imp.add_argument("directory", metavar="DIR", help="the folder save_pretrained wrote")
    imp.add_argument("--device", choices=["rbln", "neuron"], default=None,
                     help="the SDK that wrote DIR (default: found from its config file)")
    imp.add_argument("--model", default=None,
                     help="Hugging Face folder with the tokenizer (default: DIR itself)")
    imp.add_argument("--check", action="store_true", help="reconcile and print the plan; copy nothing")
    for flag, dest, kind in (("--max-num-seqs", "max_num_seqs", int), ("--max-model-len", "max_model_len", int),
                             ("--tensor-parallel-size", "tensor_parallel_size", int), ("--dtype", "dtype", str),
                             ("--block-size", "block_size", int)):
        imp.add_argument(flag, dest=dest, type=kind, default=None,
                         help=f"refuse DIR unless it was compiled with this {dest}")
    imp.add_argument("--cache-dir", default=argparse.SUPPRESS, help="cache root (default: $LLMCORE_CACHE_DIR)")
    imp.set_defaults(func=run_import_command)
    return p


def run_import_command(args: argparse.Namespace) -> int:
    explicit = {k: getattr(args, k) for k in ("max_num_seqs", "max_model_len", "tensor_parallel_size", "dtype",
                                              "block_size")}
    try:
        done = adopt(args.directory, device=args.device, model=args.model, explicit=explicit, check=args.check,
                     cache=CompileCache(getattr(args, "cache_dir", None)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (LlmcoreError, CacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"plan for {done.device} (read from {args.directory}):")
    for line in done.plan.describe().splitlines():
        print("  " + line)
    if done.entry is None:
        print("check       ok: the directory's settings reconcile; nothing copied")
    else:
        print(f"imported    {done.entry.path}")
        print(f"cache key   {done.entry.digest}")
        print(f"serve it    llmcore generate --compiled {done.entry.digest[:16]}")
    return EXIT_OK


class _Forward(logging.Handler):
    """Shows the cache's warnings (a corrupt entry found and removed) as progress lines."""

    def __init__(self, say) -> None:
        super().__init__(logging.WARNING)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        self.say("warning: " + record.getMessage())


def run_compile_command(args: argparse.Namespace) -> int:
    out = sys.stdout

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    def fail(code: int, msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"ok": False, "error": msg, "exit_code": code}), file=out)
        return code

    request = CompileRequest(
        device=args.device, batch_size=args.batch_size, max_seq_len=args.max_seq_len, model=args.model,
        dtype=args.dtype, quantization=args.quantization, tensor_parallel=args.tensor_parallel,
        buckets=args.buckets, seq_buckets=args.seq_buckets, block_size=args.block_size,
        settings=device_settings(args),
    )
    cache = CompileCache(args.cache_dir, args.shared_cache_dir)
    forward = _Forward(say)
    cache_log = logging.getLogger("llmcore.compile_cache")
    cache_log.addHandler(forward)
    propagate, cache_log.propagate = cache_log.propagate, False  # shown once, by `forward`
    try:
        try:
            planned = plan_compile(request, cache)
        except ConfigError as exc:
            return fail(EXIT_CONFIG, str(exc))
        except LlmcoreError as exc:
            return fail(EXIT_FAILED, str(exc))
        result: dict[str, Any] = {
            "ok": True, "device": planned.plan.device, "plan": planned.plan.to_dict(),
            "model_path": str(planned.model_path), "usable": planned.usable,
            "key": planned.key.digest() if planned.key else None,
            "key_summary": planned.key.summary() if planned.key else None,
            "recompile_command": planned.request.command(),
        }
        if not args.json:
            _print_plan(planned, cache, out)
        if args.dry_run:
            if not planned.usable and not args.json:
                print(f"note: {planned.unusable_message()} (dry run: plan only)", file=out)
            if args.json:
                print(json.dumps({**result, "dry_run": True}), file=out)
            return EXIT_OK
        if not planned.usable:
            return fail(EXIT_UNAVAILABLE, planned.unusable_message())
        try:
            outcome = run_compile(planned, cache, say=say, show_progress=not args.quiet,
                                  lock_timeout=args.lock_timeout)
        except ConfigError as exc:
            return fail(EXIT_CONFIG, str(exc))
        except DeviceUnavailableError as exc:
            return fail(EXIT_UNAVAILABLE, str(exc))
        except (LlmcoreError, CacheError) as exc:
            return fail(EXIT_FAILED, str(exc))
        entry = outcome.entry
        result.update(hit=outcome.hit, path=str(entry.path), seconds=round(outcome.seconds, 3),
                      size_bytes=entry.size_bytes)
        if args.json:
            print(json.dumps(result), file=out)
            return EXIT_OK
        if outcome.hit:
            built = entry.manifest.get("build_seconds")
            took = f", compiled earlier in {built:.1f}s" if isinstance(built, (int, float)) else ""
            print(f"cache hit   {entry.path} ({_size(entry.size_bytes)}{took}); "
                  f"nothing to compile ({outcome.seconds:.2f}s)", file=out)
        else:
            print(f"compiled    {entry.path} ({_size(entry.size_bytes)}) in {outcome.seconds:.1f}s", file=out)
        print(f"cache key   {entry.digest}", file=out)
        print(f"serve it    llmcore generate --compiled {entry.digest[:16]}   "
              f"or   Engine(compiled={entry.digest[:16]!r})", file=out)
        return EXIT_OK
    finally:
        cache_log.removeHandler(forward)
        cache_log.propagate = propagate


def _print_plan(planned, cache, out) -> None:
    name = planned.model_path.name
    print(f"plan for {planned.plan.device} ({name}, {planned.model_config.architecture}):", file=out)
    describe = getattr(planned.device, "describe_plan", None)  # a device may add its compiler's view
    for line in (describe(planned.plan, planned.model_config) if describe else planned.plan.describe()).splitlines():
        print("  " + line, file=out)
    print(f"model       {planned.model_path}", file=out)
    if planned.key is not None:
        print(f"cache key   {planned.key.digest()}  ({planned.key.summary()})", file=out)
        print(f"cache dir   {cache.root}", file=out)
    else:
        print(f"cache key   not computed here: {planned.key_problem}", file=out)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(
        prog="llmcore compile", description="Ahead-of-time compile into the compile cache."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
