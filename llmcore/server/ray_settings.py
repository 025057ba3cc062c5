"""How ``llmcore serve --ray`` runs on Ray Serve: replicas or autoscaling, resources per replica.

Settings only: :class:`RaySettings`, their checks, the ``ray:`` block of a config file
(:func:`settings_from_yaml`) and the ``--ray*`` options (:func:`merge_cli`). Ray is not imported
here; :mod:`llmcore.server.ray_serve` deploys.
"""


from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from llmcore.config import EngineConfig
from llmcore.errors import ConfigError

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
