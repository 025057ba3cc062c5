"""Replicas of the OpenAI-compatible server on Ray Serve (``llmcore serve --ray``).

Each replica is a Ray actor that builds its own engines, exactly as ``llmcore serve`` does: the
same models, device, dtype and engine options. The capability probe runs inside the replica, on
the resources Ray gave it. The replica then serves the FastAPI app of :mod:`llmcore.server.app`
through ``@serve.ingress``. Ray Serve's HTTP proxy listens on ``--host``/``--port`` and
routes each request to a replica::

    client --HTTP--> Ray Serve HTTP proxy --> replica i: FastAPI app -> AsyncEngine -> device

Every response carries an ``x-llmcore-replica`` header naming the replica that answered.

This module does not import ray at import time. The settings and their checks
(:class:`RaySettings`, :func:`settings_from_yaml`, :func:`merge_cli`) work without Ray
installed; ray is imported only when the app is deployed (and inside the replicas).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from llmcore.errors import ConfigError, LlmcoreError

log = logging.getLogger("llmcore.server.ray")

INSTALL_HINT = "pip install 'llmcore[ray]'"
APP_NAME = "llmcore"
DEPLOYMENT_NAME = "llmcore"
REPLICA_HEADER = "x-llmcore-replica"
# Ray Serve's default target (2 ongoing requests per replica) suits models that serve one request at
# a time. An llmcore replica batches requests, so it should take more before Ray adds a replica.
DEFAULT_TARGET_ONGOING_REQUESTS = 16
DEFAULT_MIN_REPLICAS = 1
UNBOUNDED_QUEUE_SHARE = 1024  # what an unbounded max_queue (null) counts for in max_ongoing_requests
HEALTH_HEADROOM = 16  # /health, /metrics, /v1/models on top of the models' admission limit

_YAML_KEYS = ("replicas", "autoscaling_config", "num_cpus_per_replica", "num_gpus_per_replica", "address",
              "max_ongoing_requests")
_AUTOSCALE_FLAGS = {"min_replicas": "--autoscale-min-replicas", "max_replicas": "--autoscale-max-replicas",
                    "target_ongoing_requests": "--target-ongoing-requests"}
_CLI_FLAGS = {"replicas": "--replicas", "num_cpus_per_replica": "--ray-num-cpus-per-replica",
              "num_gpus_per_replica": "--ray-num-gpus-per-replica", "address": "--ray-address",
              "max_ongoing_requests": "--ray-max-ongoing-requests", **_AUTOSCALE_FLAGS}
_AUTOSCALE_HINT = ("Give either a fixed number of replicas (--replicas N, YAML ray.replicas) or autoscaling "
                   "(--autoscale-min-replicas/--autoscale-max-replicas/--target-ongoing-requests, YAML "
                   "ray.autoscaling_config), not both")


@dataclass
class RaySettings:
    """How the server runs on Ray Serve. ``replicas`` and ``autoscaling_config`` exclude each other."""

    replicas: int | None = None  # a fixed count; None = 1, unless autoscaling_config is set
    autoscaling_config: dict[str, Any] | None = None  # passed to Ray Serve (min_replicas, max_replicas, ...)
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    address: str | None = None  # join this Ray cluster; None = $RAY_ADDRESS, else start a local instance
    max_ongoing_requests: int | None = None  # None = the models' admission limit (see default_max_ongoing)
    # the option names errors should use for each setting (command-line flag or YAML key)
    names: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def name(self, key: str) -> str:
        return self.names.get(key, _CLI_FLAGS.get(key, key))

    def short(self, key: str) -> str:
        """The option name without the config file's path (for the second option of a message)."""
        return self.name(key).rsplit(": ", 1)[-1]

    def example(self, key: str, value: Any) -> str:
        """How to set ``key`` to ``value`` where it came from: ``--flag V`` or ``key: V`` in the YAML file."""
        name = self.name(key)
        return f"{name} {value}" if name.startswith("--") else f"{name.rsplit('.', 1)[-1]}: {value}"

    @property
    def threads(self) -> int:
        """Torch threads per replica: the whole CPUs Ray reserves for it (at least 1)."""
        return max(1, math.floor(self.num_cpus_per_replica))

    def describe(self) -> str:
        cpus = f"{self.num_cpus_per_replica:g} CPU" + ("s" if self.num_cpus_per_replica != 1 else "")
        res = cpus + (f" + {self.num_gpus_per_replica:g} GPU" if self.num_gpus_per_replica else "")
        if self.autoscaling_config is not None:
            a = self.autoscaling_config
            return (f"autoscaling {a.get('min_replicas', DEFAULT_MIN_REPLICAS)}-{a.get('max_replicas')} replicas, "
                    f"target {a.get('target_ongoing_requests', DEFAULT_TARGET_ONGOING_REQUESTS)} ongoing "
                    f"requests each, {res} each")
        n = self.replicas or 1
        return f"{n} replica{'s' if n != 1 else ''} x {res}"


# ------------------------------------------------------------------ settings: checks, YAML, command line


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_settings(s: RaySettings) -> RaySettings:
    """Refuse values that cannot work, naming the option, the value and what would work."""
    if s.replicas is not None and s.autoscaling_config is not None:
        raise ConfigError(s.name("replicas"), s.replicas,
                          f"cannot be combined with {s.short('autoscaling_config')}", _AUTOSCALE_HINT)
    if s.replicas is not None and (not _is_int(s.replicas) or s.replicas < 1):
        raise ConfigError(s.name("replicas"), s.replicas, "must be an integer >= 1",
                          f"e.g. {s.example('replicas', 2)}; to let Ray Serve scale down to zero replicas use "
                          "autoscaling with a minimum of 0 (--autoscale-min-replicas 0 --autoscale-max-replicas N)")
    if s.autoscaling_config is not None:
        a = s.autoscaling_config
        if not isinstance(a, dict):
            raise ConfigError(s.name("autoscaling_config"), a, "must be a mapping",
                              "e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}")
        if "max_replicas" not in a:
            key = next((k for k in _AUTOSCALE_FLAGS if k in a), None)
            raise ConfigError(s.name(key) if key else s.name("autoscaling_config"), a[key] if key else a,
                              f"needs {s.short('max_replicas')}: autoscaling needs the most replicas Ray Serve "
                              "may start", f"e.g. add {s.example('max_replicas', 4)}")
        mx = a["max_replicas"]
        if not _is_int(mx) or mx < 1:
            raise ConfigError(s.name("max_replicas"), mx, "must be an integer >= 1", "e.g. 4")
        mn = a.get("min_replicas", DEFAULT_MIN_REPLICAS)
        if not _is_int(mn) or mn < 0:
            raise ConfigError(s.name("min_replicas"), mn, "must be an integer >= 0",
                              "0 lets Ray Serve stop every replica when idle; the default is 1")
        if mn > mx:
            raise ConfigError(s.name("min_replicas"), mn, f"is larger than {s.short('max_replicas')}={mx}",
                              f"Use a minimum <= {mx}, or raise the maximum")
        tgt = a.get("target_ongoing_requests", DEFAULT_TARGET_ONGOING_REQUESTS)
        if not _is_num(tgt) or tgt <= 0:
            raise ConfigError(s.name("target_ongoing_requests"), tgt, "must be a number > 0",
                              f"e.g. {DEFAULT_TARGET_ONGOING_REQUESTS} (requests in flight per replica before "
                              "Ray Serve adds one)")
        if s.max_ongoing_requests is not None and _is_num(tgt) and tgt > s.max_ongoing_requests:
            raise ConfigError(s.name("target_ongoing_requests"), tgt,
                              f"is above {s.short('max_ongoing_requests')}={s.max_ongoing_requests}, so a "
                              "replica could never reach it", "Lower the target or raise the maximum")
    if not _is_num(s.num_cpus_per_replica) or s.num_cpus_per_replica <= 0:
        raise ConfigError(s.name("num_cpus_per_replica"), s.num_cpus_per_replica, "must be a number > 0",
                          "e.g. 1 (the replica's engine then runs 1 torch thread)")
    if not _is_num(s.num_gpus_per_replica) or s.num_gpus_per_replica < 0:
        raise ConfigError(s.name("num_gpus_per_replica"), s.num_gpus_per_replica, "must be a number >= 0",
                          "e.g. 1 for one GPU per replica, 0 for CPU replicas")
    if s.max_ongoing_requests is not None and (not _is_int(s.max_ongoing_requests) or s.max_ongoing_requests < 1):
        raise ConfigError(s.name("max_ongoing_requests"), s.max_ongoing_requests, "must be an integer >= 1",
                          "or leave it unset: the models' max_num_seqs + max_queue")
    if s.address is not None and (not isinstance(s.address, str) or not s.address.strip()):
        raise ConfigError(s.name("address"), s.address, "must be a Ray address",
                          "e.g. auto, ray://head:10001 or head:6379; leave it unset to start a local Ray instance")
    return s


def settings_from_yaml(value: Any, where: str) -> RaySettings | None:
    """The ``ray:`` block of a server config file (``where`` is ``"<file>: ray"``).

    ``ray: true`` (or an empty block) serves 1 replica; ``ray: false`` or ``null`` turns Ray off.
    """
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(where, value, "must be a mapping, true or false",
                          "e.g. ray: {replicas: 2, num_cpus_per_replica: 1}")
    for key in value:
        if key not in _YAML_KEYS:
            raise ConfigError(f"{where}.{key}", value[key], "is not a known key", f"Use: {', '.join(_YAML_KEYS)}")
    s = RaySettings(names={k: f"{where}.{k}" for k in _YAML_KEYS})
    s.names.update({k: f"{where}.autoscaling_config.{k}" for k in _AUTOSCALE_FLAGS})
    for key in _YAML_KEYS:
        if key in value and value[key] is not None:
            v = value[key]
            setattr(s, key, dict(v) if key == "autoscaling_config" and isinstance(v, dict) else v)
    return check_settings(s)


def merge_cli(base: RaySettings | None, args: Any) -> RaySettings | None:
    """Apply the ``--ray*`` / ``--replicas`` / ``--autoscale-*`` options on top of the config file's block.

    Returns ``None`` when Ray is not asked for. A Ray option without ``--ray`` (and without a
    ``ray:`` block in the config file) is an error.
    """
    given = {k: getattr(args, k, None) for k in _CLI_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if not getattr(args, "ray", False) and base is None:
        if given:
            key = next(iter(given))
            raise ConfigError(_CLI_FLAGS[key], given[key], "needs --ray",
                              "Add --ray to serve replicas on Ray Serve (or a 'ray:' block in the --config file)")
        return None
    s = copy.deepcopy(base) if base is not None else RaySettings()
    auto = {k: given[k] for k in _AUTOSCALE_FLAGS if k in given}
    if "replicas" in given and auto:
        first = next(iter(auto))
        raise ConfigError("--replicas", given["replicas"], f"cannot be combined with {_CLI_FLAGS[first]}",
                          _AUTOSCALE_HINT)
    if "replicas" in given:  # the command line replaces the file's replica settings
        s.replicas, s.autoscaling_config = given["replicas"], None
        s.names["replicas"] = "--replicas"
    if auto:
        s.replicas = None
        s.autoscaling_config = {**(s.autoscaling_config or {}), **auto}
        s.names.update({k: _CLI_FLAGS[k] for k in auto})
        s.names.setdefault("autoscaling_config", "--autoscale-max-replicas")
    for key in ("num_cpus_per_replica", "num_gpus_per_replica", "address", "max_ongoing_requests"):
        if key in given:
            setattr(s, key, given[key])
            s.names[key] = _CLI_FLAGS[key]
    return check_settings(s)


def check_models(cfg: Any, s: RaySettings) -> None:
    """Refuse model/resource combinations that cannot work in a replica (before starting Ray)."""
    for spec in cfg.models:
        dev = str(spec.engine_kwargs.get("device") or "")
        if dev.split(":")[0] == "cuda" and s.num_gpus_per_replica <= 0:
            raise ConfigError(s.name("num_gpus_per_replica"), s.num_gpus_per_replica,
                              f"gives model {spec.name!r} (device {dev}) no GPU: Ray hides every GPU from a "
                              "replica that reserves none", f"Reserve one: {s.example('num_gpus_per_replica', 1)}")


def default_max_ongoing(cfg: Any) -> int:
    """The requests one replica's app admits at once: sum over models of max_num_seqs + max_queue."""
    from llmcore.config import EngineConfig

    default_seqs = next(f.default for f in dataclasses.fields(EngineConfig) if f.name == "max_num_seqs")
    total = HEALTH_HEADROOM
    for spec in cfg.models:
        seqs = spec.engine_kwargs.get("max_num_seqs") or default_seqs
        queue = cfg.max_queue if spec.max_queue == "default" else spec.max_queue
        total += seqs + (UNBOUNDED_QUEUE_SHARE if queue is None else queue)
    return total


def replica_config(cfg: Any, s: RaySettings) -> Any:
    """The server config each replica builds its engines from: ``num_threads`` follows the replica's CPUs."""
    rcfg = dataclasses.replace(cfg, models=[dataclasses.replace(m, engine_kwargs=dict(m.engine_kwargs))
                                            for m in cfg.models], ray=None)
    for spec in rcfg.models:
        spec.engine_kwargs.setdefault("num_threads", s.threads)
    return rcfg


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

    def __init__(self, cfg: Any, threads: int) -> None:
        import torch

        from llmcore.server.cli import _setup_logging, load_models

        _setup_logging(cfg.log_level)
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.replica_id = _replica_id()
        log.info("replica %s: loading %d model(s) with %d torch thread(s)", self.replica_id, len(cfg.models),
                 threads)
        self.served = load_models(cfg)  # the capability probe runs here, on this replica's resources
        log.info("replica %s ready: %s", self.replica_id,
                 ", ".join(f"{m.name} on {m.device_name()}" for m in self.served))

    def __serve_build_asgi_app__(self) -> Any:
        from llmcore.server.app import create_app

        app = create_app(self.served, api_keys=self.cfg.api_keys, shutdown_engines=True)
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
        from ray import serve

        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", None) or rid)
    except Exception:  # pragma: no cover - outside a replica
        return f"{socket.gethostname()}-{os.getpid()}"


# ------------------------------------------------------------------ deploying


def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.serve)``, or an ``ImportError`` whose message names the install command."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray Serve, which is not installed here ({exc}). "
                          f"Install it: {INSTALL_HINT}") from exc
    return ray, serve


def build_application(cfg: Any, s: RaySettings, access_log: bool = True) -> Any:
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
        try:
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


def _check_port_free(host: str, port: int) -> None:
    """Refuse a busy port before starting Ray (a clear error, not a proxy that fails to start)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        raise ConfigError("--port", port, f"cannot be used on {host}: {exc.strerror or exc}",
                          "Pick a free port, or --port 0 for any free one") from None


def free_port(host: str) -> int:
    infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(addr)
        return sock.getsockname()[1]


def deploy(cfg: Any, s: RaySettings, *, port: int | None = None, access_log: bool = True) -> str:
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
        from ray.serve.context import _get_global_client

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


def run(cfg: Any, s: RaySettings, access_log: bool = True) -> int:
    """``llmcore serve --ray``: start or join Ray, deploy, print the URL, serve until SIGINT/SIGTERM."""
    address = s.address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    try:
        check_models(cfg, s)
        if local and cfg.port:
            _check_port_free(cfg.host, cfg.port)
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
