"""What Neuron hardware and software is on this machine, found without importing any of it.

The probe must stay cheap and side-effect free, so everything here reads
``/dev``, ``/sys`` and installed-package metadata only. Importing
``optimum.neuron`` would pull in torch, transformers and the Neuron runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmcore.capabilities import KV_FIXED_SLOTS, Capabilities
from llmcore.compiled.vendor import UNVERIFIED, device_nodes, installed_version
from llmcore.compiled.vendor import missing_sdk as _missing
from llmcore.errors import ConfigError

GIB = 2**30

#: Distributions the compile and serve paths need, and the module each provides.
SDK_DISTRIBUTIONS = {
    "optimum-neuron": "optimum",
    "torch-neuronx": "torch_neuronx",
    "neuronx-cc": "neuronxcc",
    "neuronx-distributed": "neuronx_distributed",
}
RUNTIME_LIBRARIES = ("/opt/aws/neuron/lib/libnrt.so.1", "/opt/aws/neuron/lib/libnrt.so")
PRODUCT_NAME_FILE = "/sys/devices/virtual/dmi/id/product_name"

INSTALL_HINT = (
    "Run on an inf2/trn1/trn2 instance with the Neuron driver and runtime (aws-neuronx-dkms, "
    "aws-neuronx-runtime-lib from https://apt.repos.neuron.amazonaws.com) and install the SDK: "
    "pip install 'llmcore[neuron]' 'optimum-neuron[neuronx]' --extra-index-url "
    "https://pip.repos.neuron.amazonaws.com (pypi.org's neuronx-cc and torch-neuronx are placeholders)"
)


@dataclass(frozen=True)
class Target:
    """One Neuron instance family, as far as planning needs to know it."""

    name: str
    cores_per_device: int  # NeuronCores optimum-neuron uses per /dev/neuronN
    memory_per_core: int  # device memory (HBM) behind one of those cores
    max_cores: int  # the largest instance of the family
    largest_instance: str


TARGETS = {
    # Inferentia2 chip: 32 GiB HBM shared by 2 NeuronCore-v2 -> 16 GiB per core.
    "inf2": Target("inf2", 2, 16 * GIB, 24, "inf2.48xlarge"),
    # Trainium chip: 32 GiB HBM, 2 NeuronCore-v2.
    "trn1": Target("trn1", 2, 16 * GIB, 32, "trn1.32xlarge"),
    # Trainium2 chip: 96 GiB HBM, 8 physical cores grouped by pairs (logical core size 2)
    # into the 4 cores optimum-neuron uses -> 24 GiB per logical core.
    "trn2": Target("trn2", 4, 24 * GIB, 64, "trn2.48xlarge"),
}
DEFAULT_TARGET = "inf2"
#: optimum-neuron's instance_type normalisation (utils/instance.py INSTANCE_VALUE_MAP)
COMPILE_TARGETS = {"inf2": "trn1", "trn1": "trn1", "trn2": "trn2"}


def neuron_devices(dev: str = "/dev") -> list[str]:
    return device_nodes("neuron", dev)


def instance_family() -> str | None:
    """``inf2`` for an inf2.xlarge, from DMI; None off AWS or when unreadable."""
    try:
        product = Path(PRODUCT_NAME_FILE).read_text().strip()
    except OSError:
        return None
    family = product.split(".")[0]
    if family == "trn1n":
        return "trn1"
    return family if family in TARGETS else None


def resolve_target(requested: str | None = None) -> str:
    """The instance family to plan and compile for: asked > $LLMCORE_NEURON_TARGET > detected > inf2."""
    name = requested or os.environ.get("LLMCORE_NEURON_TARGET") or instance_family() or DEFAULT_TARGET
    if name == "trn1n":
        name = "trn1"
    if name not in TARGETS:
        raise ConfigError("neuron_target", name, "is not a Neuron instance family",
                          f"Use one of: {', '.join(TARGETS)}")
    return name


def missing_sdk() -> list[str]:
    return _missing(SDK_DISTRIBUTIONS)


def runtime_library() -> str | None:
    for path in RUNTIME_LIBRARIES:
        if os.path.exists(path):
            return path
    return None


def sdk_versions() -> dict[str, str]:
    return {d: installed_version(d) or "not installed" for d in SDK_DISTRIBUTIONS}


def capabilities(target: str = DEFAULT_TARGET, num_cores: int | None = None) -> Capabilities:
    """What Neuron offers for ``target``; ``num_cores`` defaults to its largest instance."""
    t = TARGETS[target]
    cores = num_cores or t.max_cores
    notes = [
        UNVERIFIED,
        "batch slots and sequence length are fixed at compile time (llmcore compile --device neuron)",
        "dtype is the export dtype (optimum-neuron casts weights and compute to it)",
        "one context-encoding graph (prompt prefilled in one pass) and one decode graph for all slots",
    ]
    if num_cores is None:
        notes.append(f"no Neuron device here: planning for {target} up to {t.largest_instance} "
                     f"({t.max_cores} NeuronCores)")
    return Capabilities(
        dtypes=("bfloat16", "float16", "float32"),
        default_dtype="bfloat16",
        quantization=(),
        kv_layout=KV_FIXED_SLOTS,
        needs_compile=True,
        static_shapes=True,
        memory_bytes=t.memory_per_core,
        device_count=cores,
        tensor_parallel=True,
        notes=tuple(notes),
    )
