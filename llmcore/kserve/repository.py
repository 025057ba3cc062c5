"""A Triton-style model repository: one folder per model, one numbered folder per version.

.. code-block:: text

    models/
      smol/
        config.yaml          # optional: settings for every version of the model
        1/                   # a version: a Hugging Face folder (config.json + *.safetensors) or one .gguf,
        2/                   #   or empty when config.yaml says `model:`
      qwen/
        config.yaml
        1/

``config.yaml`` (every key optional)::

    device: cpu                # any Engine option: dtype, max_num_seqs, max_model_len, compiled, ...
    max_num_seqs: 16
    model: null                # instead of the version folder: a path (relative to it) or null (embedded model)
    max_queue: 64              # server limits for this model (default: the server's)
    request_timeout: 120
    version_policy: all        # all (default) | latest | [1, 3]: the versions that load
    unload: drain              # drain (default): finish running requests first | abort: stop them
    versions:                  # per-version overrides
      2: {dtype: float32}

The folder is read again at every load, so a new version or a changed config is picked up by
``POST /v2/repository/models/{m}/load`` without restarting the server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcore.config import EngineConfig
from llmcore.errors import ConfigError

CONFIG_FILE = "config.yaml"
SERVER_KEYS = {"model", "max_queue", "request_timeout"}
MODEL_KEYS = {"version_policy", "unload", "versions"}
UNLOAD_MODES = ("drain", "abort")
DEFAULT = "default"  # a server limit not set for the model: the server's own applies


def engine_option_names() -> set[str]:
    return ({f.name for f in dataclasses.fields(EngineConfig)} - {"model", "extra"}) | {"progress"}


@dataclass
class VersionSpec:
    """What to build for one version: the model to load and its engine and server settings."""

    name: str
    version: int
    model: str | None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    max_queue: int | None | str = DEFAULT
    request_timeout: float | None | str = DEFAULT

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass
class ModelEntry:
    name: str
    path: Path
    versions: list[VersionSpec]  # those the version policy loads, lowest first
    unload: str = "drain"


def list_models(root: Path) -> list[str]:
    """The model folders of a repository (sorted), whether or not they would load."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # part of the serve extra

    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "...", f"is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), data, "must be a mapping of settings", "e.g. device: cpu")
    return data


def _check_settings(settings: dict[str, Any], where: str) -> None:
    allowed = engine_option_names() | SERVER_KEYS
    for key in settings:
        if key not in allowed:
            raise ConfigError(f"{where}: {key}", settings[key], "is not a setting",
                              f"Use {', '.join(sorted(MODEL_KEYS | SERVER_KEYS))} or an engine option "
                              f"({', '.join(sorted(engine_option_names()))})")


def _model_path(vdir: Path, settings: dict[str, Any], cfg_path: Path) -> str | None:
    if "model" in settings:
        m = settings["model"]
        if m is None:
            return None
        p = Path(str(m)).expanduser()
        return str(p if p.is_absolute() else (vdir / p).resolve())
    if (vdir / "config.json").is_file():
        return str(vdir)
    ggufs = sorted(vdir.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(ggufs[0])
    if "compiled" in settings:
        return None
    found = "several .gguf files" if ggufs else "no model"
    raise ConfigError(str(vdir), "...", f"holds {found}",
                      f"Put a Hugging Face folder (config.json + *.safetensors) or one .gguf file there, "
                      f"or set 'model:' in {cfg_path}")


def _policy(policy: Any, found: list[int], where: str) -> list[int]:
    if policy in (None, "all"):
        return found
    if policy == "latest":
        return found[-1:]
    if isinstance(policy, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in policy):
        missing = sorted(set(policy) - set(found))
        if missing:
            raise ConfigError(f"{where}: version_policy", policy, f"names version(s) {missing} with no folder",
                              f"Versions present: {found}")
        return sorted(set(policy))
    raise ConfigError(f"{where}: version_policy", policy, "is not a policy", "Use all, latest or a list like [1, 3]")


def read_model(root: Path, name: str) -> ModelEntry:
    """Read one model folder; every error names the file or folder and the setting."""
    path = Path(root) / name
    if not path.is_dir():
        raise ConfigError("model", name, f"is not a folder of the repository {root}",
                          f"Models there: {', '.join(list_models(root)) or 'none'}")
    cfg_path = path / CONFIG_FILE
    data = _read_yaml(cfg_path)
    base = {k: v for k, v in data.items() if k not in MODEL_KEYS}
    _check_settings(base, str(cfg_path))
    unload = data.get("unload", "drain")
    if unload not in UNLOAD_MODES:
        raise ConfigError(f"{cfg_path}: unload", unload, "is not an unload mode", "Use drain or abort")
    overrides = data.get("versions") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{cfg_path}: versions", overrides, "must map version numbers to settings")
    found = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)
    if not found:
        raise ConfigError(str(path), "...", "has no version folder",
                          f"Create {path}/1/ holding the model (or an empty one with 'model:' in {CONFIG_FILE})")
    specs = []
    for v in _policy(data.get("version_policy"), found, str(cfg_path)):
        extra = overrides.get(v, overrides.get(str(v))) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{cfg_path}: versions.{v}", extra, "must be a mapping of settings")
        _check_settings(extra, f"{cfg_path}: versions.{v}")
        settings = {**base, **extra}
        spec = VersionSpec(name, v, _model_path(path / str(v), settings, cfg_path),
                           {k: val for k, val in settings.items() if k not in SERVER_KEYS})
        spec.max_queue = settings.get("max_queue", DEFAULT)
        spec.request_timeout = settings.get("request_timeout", DEFAULT)
        specs.append(spec)
    return ModelEntry(name, path, specs, unload)
