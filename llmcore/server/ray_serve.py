"""Replicas of the OpenAI-compatible server on Ray Serve (``llmcore serve --ray``).

Each replica is a Ray actor that builds its own engines, exactly as ``llmcore serve`` does: the
same models, device, dtype and engine options. The capability probe runs inside the replica, on
the resources Ray gave it. The replica then serves the FastAPI app of :mod:`llmcore.server.app`
through ``@serve.ingress``. Ray Serve's HTTP proxy listens on ``--host``/``--port`` and
routes each request to a replica::

    client --HTTP--> Ray Serve HTTP proxy --> replica i: FastAPI app -> AsyncEngine -> device

Every response carries an ``x-llmcore-replica`` header naming the replica that answered.

Ray is an optional dependency (``llmcore[ray]``): it is imported only when the app is deployed
(and inside the replicas), by :func:`import_ray`. The settings and their checks live in
:mod:`llmcore.server.ray_settings` and work without Ray installed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Mapping

import torch

from llmcore.cli.options import setup_logging
from llmcore.errors import ConfigError, LlmcoreError
from llmcore.server.app import create_app
from llmcore.server.listen import check_port_free, free_port
from llmcore.server.ray_settings import (
    DEFAULT_MIN_REPLICAS,
    DEFAULT_TARGET_ONGOING_REQUESTS,
    RaySettings,
    check_models,
    default_max_ongoing,
    replica_config,
)
from llmcore.server.registry import load_models
from llmcore.server.settings import ServeConfig

log = logging.getLogger("llmcore.server.ray")

INSTALL_HINT = "pip install 'llmcore[ray]'"
APP_NAME = "llmcore"
DEPLOYMENT_NAME = "llmcore"
REPLICA_HEADER = "x-llmcore-replica"


# ------------------------------------------------------------------ the replica


class _ReplicaHeader:
    """ASGI middleware: add ``x-llmcore-replica: <id>`` to every HTTP response."""

    def __init__(self, app: Any, replica_id: str) -> None:
        self.app = app
        self.value = replica_id.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(REPLICA_HEADER.encode(), self.value)]
            await send(message)

        await self.app(scope, receive, send_with_header)


class LlmcoreReplica:
    """One Ray Serve replica: builds its engines in the constructor, serves the FastAPI app.

    Wrapped with ``serve.ingress()`` (the app is bound late, by ``__serve_build_asgi_app__``,
    after the engines exist) and ``serve.deployment`` in :func:`build_application`.
    """

    def __init__(self, cfg: ServeConfig, threads: int) -> None:
        setup_logging(cfg.log_level)
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.replica_id = _replica_id()
        log.info("replica %s: loading %d model(s) with %d torch thread(s)", self.replica_id, len(cfg.models),
                 threads)
        self.served = load_models(cfg)  # the capability probe runs here, on this replica's resources
        log.info("replica %s ready: %s", self.replica_id,
                 ", ".join(f"{m.name} on {m.device_name()}" for m in self.served))

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.served, api_keys=self.cfg.api_keys, shutdown_engines=True,
                         default_max_tokens=self.cfg.default_max_tokens, max_body_bytes=self.cfg.max_body_bytes)
        app.state.replica_id = self.replica_id
        app.add_middleware(_ReplicaHeader, replica_id=self.replica_id)
        return app

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a replica whose engine died is replaced."""
        dead = [m.name for m in self.served if not m.engine.is_running]
        if dead:
            raise RuntimeError(f"replica {self.replica_id}: engine of model(s) {', '.join(dead)} stopped")


def _replica_id() -> str:
    try:
        _, serve = import_ray()
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", None) or rid)
    except Exception:  # pragma: no cover - outside a replica
        return f"{socket.gethostname()}-{os.getpid()}"


# ------------------------------------------------------------------ deploying


def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.serve)``, or an ``ImportError`` whose message names the install command."""
    try:  # Ray is optional: llmcore[ray]
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray Serve, which is not installed here ({exc}). "
                          f"Install it: {INSTALL_HINT}") from exc
    return ray, serve


def build_application(cfg: ServeConfig, s: RaySettings, access_log: bool = True) -> Any:
    """The bound Ray Serve application (``serve.run`` takes it)."""
    _, serve = import_ray()
    opts: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "logging_config": {"log_level": str(cfg.log_level).upper(), "enable_access_log": access_log},
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
        "max_ongoing_requests": s.max_ongoing_requests or default_max_ongoing(cfg),
        # a replica that cannot build its engines (a bad model path, a device it cannot use) fails
        # the deployment at once instead of being retried for minutes
        "max_constructor_retry_count": 1,
    }
    if s.autoscaling_config is not None:
        auto = {"min_replicas": DEFAULT_MIN_REPLICAS, "target_ongoing_requests": DEFAULT_TARGET_ONGOING_REQUESTS,
                **s.autoscaling_config}
        try:  # Ray is optional: llmcore[ray]
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig(**auto)
        except ImportError:  # pragma: no cover - Ray moved it; let serve.deployment check
            pass
        except Exception as exc:
            raise ConfigError(s.name("autoscaling_config"), s.autoscaling_config,
                              f"is not a valid Ray Serve autoscaling config: {exc}",
                              "See https://docs.ray.io/en/latest/serve/autoscaling-guide.html") from None
        opts["autoscaling_config"] = auto
    else:
        opts["num_replicas"] = s.replicas or 1
    deployment = serve.deployment(serve.ingress()(LlmcoreReplica), **opts)
    return deployment.bind(replica_config(cfg, s), s.threads)


def _check_resources(ray: Any, s: RaySettings, local: bool) -> None:
    need = s.replicas or (s.autoscaling_config or {}).get("min_replicas", DEFAULT_MIN_REPLICAS)
    have = ray.cluster_resources()
    for res, per, flag in (("CPU", s.num_cpus_per_replica, s.name("num_cpus_per_replica")),
                           ("GPU", s.num_gpus_per_replica, s.name("num_gpus_per_replica"))):
        total = need * per
        if total > have.get(res, 0) + 1e-9:
            what = "the local Ray instance" if local else "the Ray cluster"
            msg = (f"{need} replica(s) x {per:g} {res} = {total:g} {res}s, but {what} has "
                   f"{have.get(res, 0):g}")
            if local:
                raise ConfigError(flag, per, msg, f"Serve fewer replicas, reserve fewer {res}s per replica, or "
                                  "join a larger cluster with --ray-address")
            log.warning("%s; replicas wait until the cluster grows", msg)


def deploy(cfg: ServeConfig, s: RaySettings, *, port: int | None = None, access_log: bool = True) -> str:
    """Start Serve's HTTP proxy on ``cfg.host``/``port`` and deploy the app; Ray must be initialized.

    Blocks until every replica built its engines. Returns the server URL.
    """
    _, serve = import_ray()
    port = cfg.port if port is None else port
    if port == 0:
        port = free_port(cfg.host)
    app = build_application(cfg, s, access_log)
    serve.start(http_options={"host": cfg.host, "port": port})
    host = cfg.host
    try:  # if Serve already ran on a joined cluster, its proxy kept its own host and port (Ray warns)
        from ray.serve.context import _get_global_client  # Ray is optional: llmcore[ray]

        http = _get_global_client().http_config
        host, port = http.host or host, http.port or port
    except Exception:  # pragma: no cover - a private API; the requested address is the best guess
        pass
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def undeploy(local: bool) -> None:
    """Stop what :func:`deploy` started: all of Serve on a local instance, only our app on a joined cluster."""
    _, serve = import_ray()
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception:  # pragma: no cover - shutting down anyway
        log.exception("stopping Ray Serve failed")


def run(cfg: ServeConfig, s: RaySettings, access_log: bool = True) -> int:
    """``llmcore serve --ray``: start or join Ray, deploy, print the URL, serve until SIGINT/SIGTERM."""
    address = s.address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    try:
        check_models(cfg, s)
        if local and cfg.port:
            check_port_free(cfg.host, cfg.port)
        ray, serve = import_ray()
    except (ImportError, ConfigError) as exc:
        print(f"llmcore serve: error: {exc}", file=sys.stderr)
        return 2

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM unwinds like Ctrl-C: clean shutdown
    started = False
    code = 0
    try:
        if local:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        started = True
        signal.signal(signal.SIGTERM, _terminate)  # ray.init installs its own handler, which aborts
        _check_resources(ray, s, local)
        t0 = time.monotonic()
        url = deploy(cfg, s, access_log=access_log)
        names = ", ".join(m.name for m in cfg.models)
        print(f"llmcore serve: {len(cfg.models)} model(s) ({names}) on Ray Serve ({s.describe()}) at {url}  "
              f"- OpenAI base_url {url}/v1, chat page {url}/, health {url}/health, API docs {url}/docs"
              + ("  (API key required)" if cfg.api_keys else "")
              + f"; ready in {time.monotonic() - t0:.0f} s", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("llmcore serve: shutting down Ray Serve" + (" and the local Ray instance" if local else ""),
              file=sys.stderr, flush=True)
    except (LlmcoreError, OSError) as exc:
        print(f"llmcore serve: error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:  # a replica failed to start; the status holds its traceback
        cause = _replica_error()
        print(f"llmcore serve: error: deploying on Ray Serve failed: {type(exc).__name__}: {exc}"
              + (f"\nllmcore serve: a replica could not start: {cause}" if cause else ""), file=sys.stderr)
        code = 1
    finally:
        if started:
            # Stopping must not be cut short: a local Ray instance killed half-way leaves its agents
            # running. Further Ctrl-C / SIGTERM are ignored until Ray stopped.
            old_int = signal.signal(signal.SIGINT, _ignored)
            signal.signal(signal.SIGTERM, _ignored)
            try:
                undeploy(local)
                ray.shutdown()
            finally:
                signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    return code


def _replica_error() -> str | None:
    """The last error line of the deployment's status message (a replica constructor's traceback)."""
    try:
        _, serve = import_ray()
        app = serve.status().applications.get(APP_NAME)
        dep = app.deployments.get(DEPLOYMENT_NAME) if app is not None else None
        text = (dep.message if dep is not None else "") or (app.message if app is not None else "")
    except Exception:  # pragma: no cover - best effort
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("llmcore.errors.")]
    if errors:
        return errors[-1]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return errors[-1] if errors else (lines[-1] if lines else None)


def _ignored(signum: int, frame: Any) -> None:
    print("llmcore serve: still stopping Ray, please wait", file=sys.stderr, flush=True)


def serve_status(app_name: str = APP_NAME) -> Mapping[str, int]:
    """``{replica state: count}`` of the deployment, from Ray Serve's status API (for tests and tools)."""
    _, serve = import_ray()
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    dep = app.deployments.get(DEPLOYMENT_NAME)
    return dict(dep.replica_states) if dep is not None else {}
