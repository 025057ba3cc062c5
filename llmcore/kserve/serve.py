"""What ``llmcore serve`` needs to speak KServe v2: the live model set, then the gRPC server.

The server calls, in order::

    add_serve_options(serve_parser)   # llmcore.kserve.options: --grpc-port, --model-repository
    live = live_models(served, args.model_repository, ServedModel, cfg.max_queue, cfg.request_timeout)
    app = create_app(..., live=live)                       # mounts the HTTP routes (http.mount)
    if args.grpc_port is not None:
        grpc_server.attach(app, app.state.kserve, cfg.host, args.grpc_port)
"""

from __future__ import annotations

from typing import Any, Callable

from llmcore.engine.async_engine import AsyncEngine
from llmcore.engine.engine import Engine
from llmcore.kserve.registry import Builder, LiveModels, Served
from llmcore.kserve.repository import DEFAULT, VersionSpec


def engine_builder(wrap: Callable[[str, Any, Any, Any], Served], max_queue: int | None,
                   request_timeout: float | None) -> Builder:
    """Build one version: its :class:`Engine` and :class:`AsyncEngine`, wrapped by ``wrap(name, engine,
    max_queue, request_timeout)`` (the server's ``ServedModel``)."""
    def build(spec: VersionSpec) -> Served:
        engine = Engine(model=spec.model, **spec.engine_kwargs)
        try:
            return wrap(spec.key, AsyncEngine(engine, name=spec.key),
                        max_queue if spec.max_queue == DEFAULT else spec.max_queue,
                        request_timeout if spec.request_timeout == DEFAULT else spec.request_timeout)
        except BaseException:
            engine.shutdown()
            raise

    return build


def live_models(served: list[Served], repository: str | None, wrap: Callable[[str, Any, Any, Any], Served],
                max_queue: int | None, request_timeout: float | None) -> LiveModels:
    """The models given on the command line plus, with a repository, every model in it (loaded now)."""
    live = LiveModels(engine_builder(wrap, max_queue, request_timeout), repository)
    for m in served:
        live.add(m)
    try:
        live.load_startup()
    except BaseException:
        live.shutdown()
        raise
    return live
