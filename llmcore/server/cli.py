"""``llmcore serve`` and ``llmcore batch`` (argparse sub-commands).

The main CLI wires them in with::

    from llmcore.server.cli import add_batch_parser, add_serve_parser
    add_serve_parser(subparsers)
    add_batch_parser(subparsers)
    ...
    return args.func(args)

``python -m llmcore.server serve|batch ...`` runs them without the main CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Any

from llmcore.errors import LlmcoreError
from llmcore.server.tool_parsers import PARSERS

log = logging.getLogger("llmcore.server")

SERVE_EPILOG = """\
examples:
  llmcore serve                                  # embedded SmolLM2-135M-Instruct on the best device
  llmcore serve --model ./Qwen2.5-0.5B-Instruct --device cpu --port 8080
  llmcore serve --model ./a --model ./b --served-model-name a --served-model-name b
  llmcore serve --config models.yaml --api-key $KEY
  llmcore serve --ray --replicas 2 --device cpu --ray-num-cpus-per-replica 1   # 2 replicas on Ray Serve
  llmcore serve --ray --autoscale-min-replicas 1 --autoscale-max-replicas 4 --ray-address auto

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'

config file (YAML):
  host: 127.0.0.1
  port: 8000
  api_keys: ["${LLMCORE_API_KEY}"]
  max_queue: 256
  request_timeout: 600
  models:
    - {name: smol, model: null, device: cpu, max_num_seqs: 32}
    - {name: qwen, model: /models/Qwen2.5-7B-Instruct, device: cuda, dtype: bfloat16, max_queue: 64}
  ray:                      # optional: replicas on Ray Serve, as with --ray
    num_gpus_per_replica: 1
    autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}

Options given on the command line override the file's top-level settings;
--model entries are served in addition to the file's models.
Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
/health, /metrics, /docs (OpenAPI at /openapi.json), and a chat page at /.
"""

BATCH_EPILOG = """\
input lines (OpenAI batch format):
  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}
  url may be /v1/chat/completions, /v1/completions or /v1/embeddings.

output lines:
  {"id": "batch_req_...", "custom_id": "q1",
   "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

Bad lines are reported on stderr with their line number and written as error
lines; the job goes on. Rerun the same command to resume an interrupted job:
custom_ids already in OUTPUT are skipped.
exit status: 0 all lines succeeded, 1 some lines failed, 2 bad usage, 130 interrupted.
"""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def _seconds(text: str) -> float | None:
    if text.lower() in ("none", "0", "off"):
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 (or 'none')")
    return v


def _gib(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _add_engine_options(p: argparse.ArgumentParser, multi_model: bool) -> None:
    # Same names as `llmcore generate`; defaults are None so a YAML file's per-model settings stand
    # unless an option is given.
    g = p.add_argument_group("model and engine")
    if multi_model:
        g.add_argument("--model", "-m", action="append", default=None, metavar="M",
                       help="local Hugging Face folder or .gguf file; repeat to serve several. "
                            "Default (no --model and no --config): the embedded SmolLM2-135M-Instruct")
        g.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                       help="name clients use in \"model\"; one per --model, in order "
                            "(default: the folder name, or SmolLM2-135M-Instruct)")
    else:
        g.add_argument("--model", "-m", default=None, metavar="M",
                       help="local Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
        g.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="model name written into the responses (default: the folder name)")
    g.add_argument("--device", "-d", default=None, metavar="D",
                   help="device name (cpu, cuda, neuron, rbln, ...); default: the highest-scoring usable "
                        "device (see 'llmcore devices')")
    g.add_argument("--dtype", default=None, metavar="T", help="auto (default), float32, bfloat16 or float16")
    g.add_argument("--quantization", "-q", default=None, help="weight quantization method, if the device offers it")
    g.add_argument("--max-model-len", type=_positive_int, default=None, metavar="N",
                   help="longest prompt + output, in tokens (default: the model's)")
    g.add_argument("--max-num-seqs", type=_positive_int, default=None, metavar="N",
                   help="sequences decoded at once (default 64)")
    g.add_argument("--block-size", type=_positive_int, default=None, metavar="N",
                   help="KV-cache block size in tokens (default: the device's; 8 on the CPU, 16 on CUDA)")
    g.add_argument("--kv-cache-memory", type=_gib, default=None, metavar="GIB",
                   help="GiB for the KV cache (default: the device decides, 2 GiB on CPU)")
    g.add_argument("--no-prefix-caching", action="store_true", default=None, help="disable prefix caching")
    g.add_argument("--compiled", default=None,
                   help="serve a compiled artifact: a compile-cache key (prefix) or entry path from 'llmcore compile'")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: the device decides; on a busy machine 1 can be much faster)")
    g.add_argument("--seed", type=int, default=None, help="engine RNG seed for requests without a seed")
    g.add_argument("--tensor-parallel", type=_positive_int, default=None, metavar="N",
                   help="shard each model over N GPUs, one process per GPU (default 1; see docs/parallel.md)")
    g.add_argument("--compile-decode", action="store_true", default=None,
                   help="compile the decode step (CPU: torch.compile/Inductor, ~1.2x faster single-stream decode; the "
                        "first start compiles for 1-3 minutes, later starts read the on-disk cache)")
    g.add_argument("--no-native-decode", action="store_true", default=None,
                   help="CPU: decode with torch ops instead of the native C++ step (default: native where it "
                        "covers the model; see docs/cpu.md)")


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for opt, name in (("device", "device"), ("dtype", "dtype"), ("quantization", "quantization"),
                      ("max_model_len", "max_model_len"), ("max_num_seqs", "max_num_seqs"),
                      ("block_size", "block_size"), ("compiled", "compiled"), ("threads", "num_threads"),
                      ("seed", "seed"), ("tensor_parallel", "tensor_parallel_size")):
        v = getattr(args, opt, None)
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


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to an argparse sub-parser set; ``args.func(args)`` runs it and returns the exit code."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (streaming, several models, API keys, /metrics)",
        description="Serve models over an OpenAI-compatible HTTP API (FastAPI + uvicorn). Requests join "
                    "the engine's continuous batch; past --max-queue waiting requests the server answers "
                    "503 with Retry-After; a client that disconnects aborts its request.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML file listing models and server settings (see below)")
    _add_engine_options(p, multi_model=True)
    s = p.add_argument_group("server")
    s.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=_nonneg_int, default=None,
                   help="port (default 8000; 0 picks a free one and prints it)")
    s.add_argument("--api-key", action="append", default=None, metavar="K",
                   help="accepted Bearer key; repeat for several. Every route but /health and the chat page "
                        "then needs 'Authorization: Bearer K'. Default: $LLMCORE_API_KEY "
                        "(comma-separated), else no authentication")
    s.add_argument("--max-queue", type=_nonneg_int, default=None, metavar="N",
                   help="requests that may wait beyond --max-num-seqs per model before new ones get 503 "
                        "with Retry-After (default 256)")
    s.add_argument("--request-timeout", type=_seconds, default=None, metavar="S",
                   help="seconds a request may take before it is aborted (504, or an error event when "
                        "streaming); 'none' disables (default 600)")
    s.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="how replies with tools are parsed into tool_calls (default: from the model's chat "
                        "template: hermes for <tool_call> (Qwen, Hermes, and templates without tools), "
                        "llama3_json, mistral)")
    s.add_argument("--log-level", dest="serve_log_level", default=None,
                   choices=["debug", "info", "warning", "error"],
                   help="log level of the server (default info)")
    s.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="do not log one line per HTTP request")
    r = p.add_argument_group("replicas on Ray Serve (needs: pip install 'llmcore[ray]')")
    r.add_argument("--ray", action="store_true", default=False,
                   help="serve on Ray Serve: each replica builds its own engines (same model and engine options) "
                        "behind Ray Serve's HTTP proxy on --host/--port")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="a fixed number of replicas (default 1); or use the --autoscale-* options")
    r.add_argument("--autoscale-min-replicas", dest="min_replicas", type=int, default=None, metavar="N",
                   help="autoscaling: fewest replicas (default 1; 0 stops them all when idle)")
    r.add_argument("--autoscale-max-replicas", dest="max_replicas", type=int, default=None, metavar="N",
                   help="autoscaling: most replicas (required for autoscaling)")
    r.add_argument("--target-ongoing-requests", dest="target_ongoing_requests", type=float, default=None,
                   metavar="N", help="autoscaling: requests in flight per replica that Ray Serve aims at "
                                     "(default 16)")
    r.add_argument("--ray-num-cpus-per-replica", dest="num_cpus_per_replica", type=float, default=None,
                   metavar="N", help="CPUs Ray reserves for each replica (default 1); the replica's engine runs "
                                     "that many torch threads unless --threads says otherwise")
    r.add_argument("--ray-num-gpus-per-replica", dest="num_gpus_per_replica", type=float, default=None,
                   metavar="N", help="GPUs per replica (default 0); Ray gives each replica its own "
                                     "(CUDA_VISIBLE_DEVICES)")
    r.add_argument("--ray-address", dest="address", default=None, metavar="ADDR",
                   help="join this Ray cluster (auto, ray://head:10001, head:6379); default: $RAY_ADDRESS, "
                        "else start a local Ray instance that stops with the server")
    r.add_argument("--ray-max-ongoing-requests", dest="max_ongoing_requests", type=int, default=None,
                   metavar="N", help="requests Ray Serve sends to one replica at once (default: the models' "
                                     "max_num_seqs + max_queue, so the replica's own 503 applies)")
    p.set_defaults(func=serve_command)
    return p


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``batch`` to an argparse sub-parser set; ``args.func(args)`` runs it and returns the exit code."""
    p = subparsers.add_parser(
        "batch",
        help="run an OpenAI batch file (JSONL) offline through one engine; resumable",
        description="Run every request of INPUT (OpenAI batch-file format, one JSON request per line) "
                    "through one engine with continuous batching and append the results to OUTPUT.",
        epilog=BATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT.jsonl", help="requests, one JSON object per line")
    p.add_argument("output", metavar="OUTPUT.jsonl", help="results are appended here (created if absent)")
    _add_engine_options(p, multi_model=False)
    p.add_argument("--max-in-flight", type=_positive_int, default=None, metavar="N",
                   help="requests queued in the engine at once (default 4 x max-num-seqs)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=batch_command)
    return p


# ------------------------------------------------------------------ serve


def _setup_logging(level: str) -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=lvl, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llmcore").setLevel(lvl)


def build_serve_config(args: argparse.Namespace):
    """Merge the YAML file (if any) and the command line into a :class:`ServeConfig`."""
    from llmcore.errors import ConfigError
    from llmcore.server.config import ModelSpec, ServeConfig, check_engine_kwargs, default_name, load_config

    cfg = load_config(args.config) if args.config else ServeConfig()
    if args.host is not None:
        cfg.host = args.host
    if args.port is not None:
        cfg.port = args.port
    keys = args.api_key
    if keys is None and not cfg.api_keys and os.environ.get("LLMCORE_API_KEY"):
        keys = [k.strip() for k in os.environ["LLMCORE_API_KEY"].split(",") if k.strip()]
    if keys:
        cfg.api_keys = list(keys)
    if args.max_queue is not None:
        cfg.max_queue = args.max_queue
    if args.request_timeout is not None:
        cfg.request_timeout = args.request_timeout
    level = getattr(args, "serve_log_level", None) or getattr(args, "log_level", None)
    if level:
        cfg.log_level = str(level).lower()
    models = list(args.model or [])
    names = list(args.served_model_name or [])
    if names and len(names) != max(len(models), 1):
        raise ConfigError("--served-model-name", names,
                          f"gives {len(names)} name(s) for {max(len(models), 1)} model(s)",
                          "Pass one --served-model-name per --model, in the same order")
    kwargs = _engine_kwargs(args)
    check_engine_kwargs(kwargs, "command line")
    if not models and not cfg.models:
        models = [None]
    for i, m in enumerate(models):
        name = names[i] if names else default_name(m)
        if any(s.name == name for s in cfg.models):
            raise ConfigError("--served-model-name", name, "is used by another model",
                              "Give every model a unique --served-model-name")
        cfg.models.append(ModelSpec(name=name, model=m, engine_kwargs=dict(kwargs)))
    for spec in cfg.models:  # the flag sets every model's parser unless its config entry names one
        spec.tool_call_parser = spec.tool_call_parser or getattr(args, "tool_call_parser", None)
    if args.config and kwargs and not models:
        # engine flags with --config apply to the file's models unless they set the option themselves
        for spec in cfg.models:
            for k, v in kwargs.items():
                spec.engine_kwargs.setdefault(k, v)
    from llmcore.server.ray_serve import merge_cli  # settings only: ray is not imported

    cfg.ray = merge_cli(cfg.ray, args)
    return cfg


def load_models(cfg) -> list:
    """Build one engine per model of a :class:`ServeConfig` (the capability probe runs here).

    Used by ``llmcore serve`` and by every Ray Serve replica. If one model fails, the engines
    already built are stopped and the error propagates.
    """
    from llmcore.engine.async_engine import AsyncEngine
    from llmcore.engine.engine import Engine
    from llmcore.server.app import ServedModel

    served: list[ServedModel] = []
    try:
        for spec in cfg.models:
            log.info("loading model %r (%s) %s", spec.name, spec.model or "embedded SmolLM2-135M-Instruct",
                     " ".join(f"{k}={v}" for k, v in spec.engine_kwargs.items()))
            engine = Engine(model=spec.model, **spec.engine_kwargs)
            served.append(ServedModel(
                spec.name, AsyncEngine(engine, name=spec.name),
                max_queue=cfg.max_queue if spec.max_queue == "default" else spec.max_queue,
                request_timeout=cfg.request_timeout if spec.request_timeout == "default" else spec.request_timeout,
                tool_call_parser=spec.tool_call_parser,
            ))
            log.info("model %r ready on %s (max_model_len %d, max_num_seqs %d)", spec.name,
                     engine.probe.name, engine.max_model_len, engine.config.max_num_seqs)
    except BaseException:
        for m in served:
            m.engine.shutdown()
        raise
    return served


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(addr)
    sock.set_inheritable(True)
    return sock


def serve_command(args: argparse.Namespace) -> int:
    """Load the models, bind, print the URL, serve until SIGINT/SIGTERM."""
    try:
        cfg = build_serve_config(args)
    except LlmcoreError as exc:
        print(f"llmcore serve: error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    if cfg.ray is not None:
        from llmcore.server import ray_serve

        return ray_serve.run(cfg, cfg.ray, access_log=getattr(args, "access_log", True))
    try:
        import uvicorn

        from llmcore.server.app import ServedModel, create_app
    except ImportError as exc:
        print(f"llmcore serve: error: {exc}. Install the server extras: pip install 'llmcore[serve]'",
              file=sys.stderr)
        return 2

    served: list[ServedModel] = []
    try:
        served = load_models(cfg)
        app = create_app(served, api_keys=cfg.api_keys, shutdown_engines=True)
        sock = _bind(cfg.host, cfg.port)
    except (LlmcoreError, OSError, TypeError) as exc:
        for m in served:
            m.engine.shutdown()
        print(f"llmcore serve: error: {exc}", file=sys.stderr)
        return 2

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    print(f"llmcore serve: {len(served)} model(s) ({', '.join(m.name for m in served)}) at {url}  "
          f"- OpenAI base_url {url}/v1, chat page {url}/, metrics {url}/metrics, API docs {url}/docs"
          + ("  (API key required)" if cfg.api_keys else ""), flush=True)
    config = uvicorn.Config(app, log_level=cfg.log_level, access_log=getattr(args, "access_log", True),
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        for m in served:
            m.engine.shutdown()
        sock.close()
    return 0


# ------------------------------------------------------------------ batch


def batch_command(args: argparse.Namespace) -> int:
    """Run a batch file; exit 0 if every line succeeded, 1 if some failed, 2 usage error, 130 interrupted."""
    _setup_logging(getattr(args, "log_level", None) or "warning")
    try:
        from llmcore.engine.engine import Engine
        from llmcore.server.batch import BatchRunner
        from llmcore.server.config import default_name
    except ImportError as exc:
        print(f"llmcore batch: error: {exc}. Install the server extras: pip install 'llmcore[serve]'",
              file=sys.stderr)
        return 2
    if not os.path.isfile(args.input):
        print(f"llmcore batch: error: INPUT {args.input!r} is not a file", file=sys.stderr)
        return 2
    try:
        engine = Engine(model=args.model, progress=args.progress, **_engine_kwargs(args))
        runner = BatchRunner(engine, args.served_model_name or default_name(args.model),
                             max_in_flight=args.max_in_flight, progress=args.progress)
        summary = runner.run(args.input, args.output)
    except LlmcoreError as exc:
        print(f"llmcore batch: error: {exc}", file=sys.stderr)
        return 2
    print(f"llmcore batch: {summary.describe()}", file=sys.stderr, flush=True)
    if summary.interrupted:
        print("llmcore batch: interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        return 130
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m llmcore.server serve|batch ...``"""
    parser = argparse.ArgumentParser(prog="python -m llmcore.server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_batch_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
