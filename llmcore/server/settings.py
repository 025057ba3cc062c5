"""Server settings: the YAML config file and the models it lists.

.. code-block:: yaml

    host: 127.0.0.1
    port: 8000
    api_keys: ["${LLMCORE_API_KEY}"]   # environment variables are expanded
    max_queue: 256                     # prompts that may wait beyond max_num_seqs, per model
    request_timeout: 600               # seconds; null = none
    default_max_tokens: 512            # a chat request's max_tokens when it sets none
    max_body_bytes: 2097152            # larger request bodies get 413; null = no limit
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
        tool_call_parser: hermes       # how replies with tools become tool_calls (default: from the template)
    ray:                               # optional: serve replicas on Ray Serve (llmcore serve --ray)
      replicas: 2                      # or autoscaling_config: {min_replicas: 1, max_replicas: 4}
      num_cpus_per_replica: 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmcore.cli.options import engine_kwargs
from llmcore.config import EngineConfig
from llmcore.errors import ConfigError
from llmcore.server.convert import DEFAULT_CHAT_MAX_TOKENS
from llmcore.server.ray_settings import RaySettings, merge_cli, settings_from_yaml
from llmcore.server.tool_parsers import PARSERS

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
#: request bodies above this get 413 (a prompt filling a 128k-token context is about 0.5 MB of text)
DEFAULT_MAX_BODY_BYTES = 2 * 2**20
_TOP_KEYS = {"host", "port", "api_keys", "max_queue", "request_timeout", "default_max_tokens", "max_body_bytes",
             "models", "log_level", "ray"}
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
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    models: list[ModelSpec] = field(default_factory=list)
    log_level: str = "info"
    ray: RaySettings | None = None  # set when served on Ray Serve


def default_name(model: str | None) -> str:
    if model is None:
        return EMBEDDED_NAME
    p = Path(str(model).rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name or str(model)


def engine_option_names() -> set[str]:
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


def _tool_call_parser(value: Any, option: str) -> str:
    if value not in PARSERS:
        raise ConfigError(option, value, "is not a known tool call parser", f"Use one of: {', '.join(PARSERS)}")
    return value


def load_config(path: str | Path) -> ServeConfig:
    """Read and validate a YAML server config; every error names the file and the key."""
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
    if "default_max_tokens" in data:
        v = data["default_max_tokens"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{path}: default_max_tokens", v, "must be an integer >= 1", "e.g. 512")
        cfg.default_max_tokens = v
    if "max_body_bytes" in data:
        cfg.max_body_bytes = _positive_or_none(data["max_body_bytes"], f"{path}: max_body_bytes", int)
    if "log_level" in data:
        cfg.log_level = str(data["log_level"]).lower()
    if "ray" in data:
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
            spec.tool_call_parser = _tool_call_parser(entry["tool_call_parser"], f"{where}.tool_call_parser")
        cfg.models.append(spec)
    return cfg


def _api_keys_from_env() -> list[str]:
    return [k.strip() for k in os.environ.get("LLMCORE_API_KEY", "").split(",") if k.strip()]


def build_serve_config(args: argparse.Namespace) -> ServeConfig:
    """Merge the YAML file (if any) and the command line into a :class:`ServeConfig`."""
    cfg = load_config(args.config) if args.config else ServeConfig()
    for opt in ("host", "port", "max_queue", "request_timeout", "default_max_tokens", "max_body_bytes"):
        if getattr(args, opt, None) is not None:
            setattr(cfg, opt, getattr(args, opt))
    keys = args.api_key if args.api_key is not None or cfg.api_keys else _api_keys_from_env()
    if keys:
        cfg.api_keys = list(keys)
    level = getattr(args, "serve_log_level", None) or getattr(args, "log_level", None)
    if level:
        cfg.log_level = str(level).lower()
    models = list(args.model or [])
    names = list(args.served_model_name or [])
    if names and len(names) != max(len(models), 1):
        raise ConfigError("--served-model-name", names,
                          f"gives {len(names)} name(s) for {max(len(models), 1)} model(s)",
                          "Pass one --served-model-name per --model, in the same order")
    kwargs = engine_kwargs(args)
    check_engine_kwargs(kwargs, "command line")
    if not models and not cfg.models and not getattr(args, "model_repository", None):
        models = [None]  # the embedded default model, unless a model repository names the models
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
    cfg.ray = merge_cli(cfg.ray, args)
    return cfg
