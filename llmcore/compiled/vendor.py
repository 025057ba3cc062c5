"""What the vendor-compiler plugins (neuron, rbln) share: finding their SDK and cards without
importing either, and reading the config file their SDK writes into a compiled directory.

Nothing here imports a vendor SDK: package metadata, ``/dev`` and JSON files only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from llmcore.errors import ConfigError

#: Said wherever a plugin is listed: no project machine has this hardware.
UNVERIFIED = "not verified on hardware (built to the SDK's documented API, tested with stand-ins)"


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def missing_sdk(distributions: dict[str, str]) -> list[str]:
    """Distributions (``{dist: module}``) not installed, or installed without their module
    (pypi.org placeholders of wheels that live on the vendor's own index)."""
    return [d for d, module in distributions.items()
            if installed_version(d) is None or importlib.util.find_spec(module) is None]


def device_nodes(pattern: str, dev: str = "/dev") -> list[str]:
    """``/dev`` entries named ``<pattern><N>`` (e.g. neuron0, rbln3), in numeric order."""
    name = re.compile(rf"^{pattern}(\d+)$")
    try:
        found = [(int(m.group(1)), n) for n in os.listdir(dev) if (m := name.match(n))]
    except OSError:
        return []
    return [n for _, n in sorted(found)]


def read_config_file(artifact_dir: Path, filename: str, device: str) -> dict[str, Any]:
    """The JSON config ``filename`` an SDK's ``save_pretrained`` wrote into ``artifact_dir``."""
    path = Path(artifact_dir) / filename
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("compiled", str(artifact_dir), f"has no {filename}: not a {device} artifact",
                          f"Compile it with: llmcore compile --device {device} ...") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("compiled", str(path), f"is not valid JSON ({exc})",
                          "Recompile: the entry is damaged") from exc


def artifact_files(out_dir: Path) -> list[str]:
    out_dir = Path(out_dir)
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())


def mismatches(want: dict[str, Any], have: dict[str, Any], where: str) -> list[str]:
    """``name: WHERE has X, the plan has Y`` for every ``want`` field ``have`` disagrees with."""
    return [f"{k}: {where} has {have.get(k, '<missing>')!r}, the plan has {v!r}"
            for k, v in want.items() if have.get(k, "<missing>") != v]
