"""What RBLN hardware and software is on this machine, found without importing any of it.

Importing ``rebel`` or ``optimum.rbln`` loads the compiler and torch, so the
probe reads ``/dev`` and installed-package metadata only. The NPU families and
their limits below are the ones optimum-rbln 0.12.0 uses
(``modeling_attention_utils.AttentionLimits``, ``utils.runtime_utils._dram_spec``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmcore.capabilities import KV_FIXED_SLOTS, Capabilities
from llmcore.compiled.vendor import UNVERIFIED, device_nodes, installed_version
from llmcore.compiled.vendor import missing_sdk as _missing
from llmcore.errors import ConfigError
from llmcore_rbln.quantization import METHODS

GIB, MIB = 2**30, 2**20

SDK_DISTRIBUTIONS = {"rebel-compiler": "rebel", "optimum-rbln": "optimum"}

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
    raise ConfigError("rbln_npu", npu, "is not a known RBLN NPU", "Use an RBLN-CA* (ATOM) or RBLN-CR* (REBEL) name")


def resolve_npu(requested: str | None = None) -> tuple[str, bool]:
    """(NPU name, whether it was given) from the argument or $LLMCORE_RBLN_NPU, else the default."""
    name = requested or os.environ.get("LLMCORE_RBLN_NPU")
    if name:
        family(name)
        return name, True
    return DEFAULT_NPU, False


def rbln_devices(dev: str = "/dev") -> list[str]:
    return device_nodes("rbln", dev)


def missing_sdk() -> list[str]:
    return _missing(SDK_DISTRIBUTIONS)


def capabilities(npu: str = DEFAULT_NPU, num_devices: int | None = None) -> Capabilities:
    """What ``npu`` offers; ``num_devices`` defaults to a full server of cards when none is seen."""
    fam = family(npu)
    notes = [
        UNVERIFIED,
        "batch slots, max sequence length and decode batch sizes are fixed at compile time "
        "(llmcore compile --device rbln)",
        f"KV block size = max_seq_len (eager attention, up to {fam.max_eager_seq_len}) or a "
        f"flash-attention partition of {fam.min_partition_len}-{fam.max_partition_len} tokens",
        "quantization needs a checkpoint pre-quantized for RBLN (weight scales included)",
    ]
    if num_devices is None:
        notes.append(f"no RBLN device here: planning for {npu} ({fam.name}), up to "
                     f"{DEFAULT_PLANNING_DEVICES} cards")
    return Capabilities(
        dtypes=("float16", "bfloat16", "float32"),
        default_dtype="float16",
        quantization=tuple(METHODS),
        kv_layout=KV_FIXED_SLOTS,
        needs_compile=True,
        static_shapes=True,
        memory_bytes=fam.memory_bytes,
        device_count=num_devices or DEFAULT_PLANNING_DEVICES,
        tensor_parallel=True,
        notes=tuple(notes),
    )
