"""What RBLN hardware and software is on this machine, found without importing any of it.

Importing ``rebel`` or ``optimum.rbln`` loads the compiler and torch, so the
probe reads ``/dev`` and installed-package metadata only. The NPU families and
their limits below are the ones optimum-rbln 0.12.0 uses
(``modeling_attention_utils.AttentionLimits``, ``utils.runtime_utils._dram_spec``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from importlib import metadata

GIB, MIB = 2**30, 2**20

SDK_DISTRIBUTIONS = {"rebel-compiler": "rebel", "optimum-rbln": "optimum"}
DEVICE_NAME = re.compile(r"^rbln\d+$")

INSTALL_HINT = (
    "Run on a host with a Rebellions ATOM/REBEL card and the RBLN driver loaded (/dev/rbln*); install "
    "the RBLN compiler 'rebel-compiler' from Rebellions' package index (https://docs.rbln.ai, not on "
    "pypi.org) and pip install 'llmcore[rbln]' (optimum-rbln)"
)


@dataclass(frozen=True)
class NpuFamily:
    name: str
    memory_bytes: int  # device DRAM usable for weights + KV (system reserve taken out)
    max_eager_seq_len: int
    min_partition_len: int
    max_partition_len: int
    default_partition_len: int
    default_prefill_chunk: int


FAMILIES = {
    # ATOM (RBLN-CA*): 16 GiB DRAM, 288 MiB reserved by the system.
    "RBLN-CA": NpuFamily("ATOM", 16 * GIB - 288 * MIB, 32_768, 1_024, 32_768, 16_384, 128),
    # REBEL (RBLN-CR*): 144 GiB over 4 chiplets, 1 GiB reserved per chiplet.
    "RBLN-CR": NpuFamily("REBEL", 144 * GIB - 4 * GIB, 16_384, 1_024, 16_384, 8_192, 512),
}
DEFAULT_NPU = "RBLN-CA25"
#: Cards planned for when none is visible (a full ATOM server).
DEFAULT_PLANNING_DEVICES = 16


def family(npu: str) -> NpuFamily:
    for prefix, fam in FAMILIES.items():
        if npu.startswith(prefix):
            return fam
    from llmcore.errors import ConfigError

    raise ConfigError("rbln_npu", npu, "is not a known RBLN NPU", "Use an RBLN-CA* (ATOM) or RBLN-CR* (REBEL) name")


def resolve_npu(requested: str | None = None) -> tuple[str, bool]:
    """(NPU name, whether it was given) from the argument or $LLMCORE_RBLN_NPU, else the default."""
    name = requested or os.environ.get("LLMCORE_RBLN_NPU")
    if name:
        family(name)
        return name, True
    return DEFAULT_NPU, False


def rbln_devices(dev: str = "/dev") -> list[str]:
    try:
        names = os.listdir(dev)
    except OSError:
        return []
    return sorted((n for n in names if DEVICE_NAME.match(n)), key=lambda n: int(n[4:]))


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def missing_sdk() -> list[str]:
    return [d for d, module in SDK_DISTRIBUTIONS.items()
            if installed_version(d) is None or importlib.util.find_spec(module) is None]
