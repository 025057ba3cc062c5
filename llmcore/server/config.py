"""Server settings: the YAML config file and the models it lists.

.. code-block:: yaml

    host: 127.0.0.1
    port: 8000
    api_keys: ["${LLMCORE_API_KEY}"]   # environment variables are expanded
    max_queue: 256                     # prompts that may wait beyond max_num_seqs, per model
    request_timeout: 600               # seconds; null = none
    models:
      - name: smol                     # the name clients pass as "model"
        model: null                    # null = the embedded SmolLM2-135M-Instruct; else a folder or .gguf
        device: cpu
        dtype: auto
        max_num_seqs: 32               # any Engine keyword argument
      - name: big
        model: /models/Qwen2.5-7B-Instruct
        device: cuda
        dtype: bfloat16
        max_queue: 64                  # per-model override
        request_timeout: 120
    ray:                               # optional: serve replicas on Ray Serve (llmcore serve --ray)
      replicas: 2                      # or autoscaling_config: {min_replicas: 1, max_replicas: 4}
      num_cpus_per_replica: 1
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.errors import ConfigError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_TOP_KEYS = {"host", "port", "api_keys", "max_queue", "request_timeout", "models", "log_level", "ray"}
_SERVER_MODEL_KEYS = {"name", "model", "max_queue", "request_timeout", "tool_call_parser"}


@dataclass
class ModelSpec:
    """One served model: its name, what to load, and the Engine keyword arguments."""

    name: str
    model: str | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    max_queue: int | None | str = "default"  # "default" = the server-wide value
    request_timeout: float | None | str = "default"
    tool_call_parser: str | None = None  # None: chosen from the model's chat template


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    max_queue: int | None = 256
    request_timeout: float | None = 600.0
    models: list[ModelSpec] = field(default_factory=list)
    log_level: str = "info"
    ray: Any = None  # a llmcore.server.ray_serve.RaySettings when served on Ray Serve, else None


def default_name(model: str | None) -> str:
    if model is None:
        return EMBEDDED_NAME
    p = Path(str(model).rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name or str(model)


def engine_option_names() -> set[str]:
    from llmcore.config import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "extra"}
    return names | {"progress"}


def check_engine_kwargs(kwargs: dict[str, Any], where: str) -> None:
    allowed = engine_option_names()
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}", kwargs[key], "is not an engine option",
                f"Use one of: name, model, max_queue, request_timeout, tool_call_parser, {', '.join(sorted(allowed))}",
            )


def _expand(value: Any) -> Any:
    return os.path.expandvars(value) if isinstance(value, str) else value


def _positive_or_none(value: Any, option: str, kind: type) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(option, value, f"must be {'an integer' if kind is int else 'a number'} or null")
    if value < 0 or (kind is not int and value == 0):
        raise ConfigError(option, value, "must be positive" if kind is not int else "must be >= 0")
    return value


def load_config(path: str | Path) -> ServeConfig:
    """Read and validate a YAML server config; every error names the file and the key."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("--config", str(path), "does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", str(path), f"is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "must be a YAML mapping with a 'models' list")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}", data[sorted(unknown)[0]], "is not a known key",
                          f"Use: {', '.join(sorted(_TOP_KEYS))}")
    cfg = ServeConfig()
    if "host" in data:
        cfg.host = str(data["host"])
    if "port" in data:
        if not isinstance(data["port"], int) or not 0 <= data["port"] < 65536:
            raise ConfigError(f"{path}: port", data["port"], "must be an integer in [0, 65535]")
        cfg.port = data["port"]
    if "api_keys" in data:
        keys = data["api_keys"] or []
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"{path}: api_keys", keys, "must be a list of strings")
        cfg.api_keys = [k for k in (_expand(k) for k in keys) if k]
    if "max_queue" in data:
        cfg.max_queue = _positive_or_none(data["max_queue"], f"{path}: max_queue", int)
    if "request_timeout" in data:
        cfg.request_timeout = _positive_or_none(data["request_timeout"], f"{path}: request_timeout", float)
    if "log_level" in data:
        cfg.log_level = str(data["log_level"]).lower()
    if "ray" in data:
        from llmcore.server.ray_serve import settings_from_yaml  # settings only: ray is not imported

        cfg.ray = settings_from_yaml(data["ray"], f"{path}: ray")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: models", models, "must be a non-empty list",
                          "e.g. models: [{name: smol, model: null, device: cpu}]")
    seen: set[str] = set()
    for i, entry in enumerate(models):
        where = f"{path}: models[{i}]"
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(where, entry, "must be a mapping")
        entry = {k: _expand(v) for k, v in entry.items()}
        model = entry.get("model")
        if model is not None and not isinstance(model, str):
            raise ConfigError(f"{where}.model", model, "must be a path, a model name, or null (embedded model)")
        name = entry.get("name") or default_name(model)
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name", name, "must be a string")
        if name in seen:
            raise ConfigError(f"{where}.name", name, "is used by another model", "Give every model a unique name")
        seen.add(name)
        kwargs = {k: v for k, v in entry.items() if k not in _SERVER_MODEL_KEYS}
        check_engine_kwargs(kwargs, where)
        spec = ModelSpec(name=name, model=model, engine_kwargs=kwargs)
        if "max_queue" in entry:
            spec.max_queue = _positive_or_none(entry["max_queue"], f"{where}.max_queue", int)
        if "request_timeout" in entry:
            spec.request_timeout = _positive_or_none(entry["request_timeout"], f"{where}.request_timeout", float)
        if entry.get("tool_call_parser") is not None:
            spec.tool_call_parser = str(entry["tool_call_parser"])
        cfg.models.append(spec)
    return cfg
