"""What ``llmcore serve`` and ``llmcore batch`` do once their options are parsed.

``serve``: merge the config file and the options, bind the port (a busy one is an error before
any model loads), load the models, serve until SIGINT/SIGTERM. ``serve --ray`` hands over to
:mod:`llmcore.server.ray_serve`. ``batch``: one engine through a batch file.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import uvicorn

from llmcore.cli.options import engine_kwargs, setup_logging
from llmcore.engine.engine import Engine
from llmcore.errors import LlmcoreError
from llmcore.kserve import grpc_server
from llmcore.kserve.serve import live_models
from llmcore.server import ray_serve
from llmcore.server.app import create_app
from llmcore.server.batch import BatchRunner
from llmcore.server.listen import bind
from llmcore.server.registry import ServedModel, load_models
from llmcore.server.settings import ServeConfig, build_serve_config, default_name


def _fail(verb: str, exc: BaseException) -> int:
    print(f"llmcore {verb}: error: {exc}", file=sys.stderr)
    return 2


def _banner(cfg: ServeConfig, served: list[ServedModel], sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    return (f"llmcore serve: {len(served)} model(s) ({', '.join(m.name for m in served)}) at {url}  "
            f"- OpenAI base_url {url}/v1, chat page {url}/, metrics {url}/metrics, API docs {url}/docs"
            + ("  (API key required)" if cfg.api_keys else ""))


def serve_command(args: argparse.Namespace) -> int:
    """Bind, load the models, print the URL, serve until SIGINT/SIGTERM."""
    try:
        cfg = build_serve_config(args)
    except LlmcoreError as exc:
        return _fail("serve", exc)
    setup_logging(cfg.log_level, getattr(args, "log_format", "text"))
    access_log = getattr(args, "access_log", True)
    if cfg.ray is not None:
        return ray_serve.run(cfg, cfg.ray, access_log=access_log)
    try:
        sock = bind(cfg.host, cfg.port)
    except LlmcoreError as exc:
        return _fail("serve", exc)
    served: list[ServedModel] = []
    live = None
    try:
        served = load_models(cfg)
        live = live_models(served, args.model_repository, ServedModel, cfg.max_queue, cfg.request_timeout)
        served = list(live.by_name.values())
        app = create_app([], api_keys=cfg.api_keys, shutdown_engines=True, live=live,
                         default_max_tokens=cfg.default_max_tokens, max_body_bytes=cfg.max_body_bytes)
        if args.grpc_port is not None:
            grpc_server.attach(app, app.state.kserve, cfg.host, args.grpc_port, lambda s: print(s, flush=True))
    except (LlmcoreError, OSError, TypeError) as exc:
        if live is not None:
            live.shutdown()
        for m in served:
            m.engine.shutdown()
        sock.close()
        return _fail("serve", exc)
    print(_banner(cfg, served, sock), flush=True)
    config = uvicorn.Config(app, log_level=cfg.log_level, access_log=access_log,
                            timeout_graceful_shutdown=5, lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        live.shutdown()  # every model, those loaded at run time too
        sock.close()
    return 0


def batch_command(args: argparse.Namespace) -> int:
    """Run a batch file; exit 0 if every line succeeded, 1 if some failed, 2 usage error, 130 interrupted."""
    if not os.path.isfile(args.input):
        print(f"llmcore batch: error: INPUT {args.input!r} is not a file", file=sys.stderr)
        return 2
    try:
        engine = Engine(model=args.model, progress=args.progress, **engine_kwargs(args))
        runner = BatchRunner(engine, args.served_model_name or default_name(args.model),
                             max_in_flight=args.max_in_flight, progress=args.progress)
        summary = runner.run(args.input, args.output)
    except LlmcoreError as exc:
        return _fail("batch", exc)
    print(f"llmcore batch: {summary.describe()}", file=sys.stderr, flush=True)
    if summary.interrupted:
        print("llmcore batch: interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        return 130
    return 0 if summary.ok else 1
