"""Model architectures by Hugging Face name: built-ins plus plugin contributions."""

from __future__ import annotations

import logging

from llmcore.errors import ModelLoadError
from llmcore.models.llama import ARCHITECTURES
from llmcore.plugins import get_registry

log = logging.getLogger("llmcore.models")


def architectures() -> dict[str, type]:
    archs = dict(ARCHITECTURES)
    for contributed in get_registry().hook.llmcore_model_architectures():
        for name, cls in (contributed or {}).items():
            if name in archs and archs[name] is not cls:
                log.warning("architecture %s from a plugin ignored: a built-in one exists", name)
                continue
            archs[name] = cls
    return archs


def get_architecture(name: str) -> type:
    archs = architectures()
    if name not in archs:
        raise ModelLoadError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(archs))}"
        )
    return archs[name]
