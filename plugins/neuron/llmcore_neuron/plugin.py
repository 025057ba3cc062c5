"""AWS Neuron (Inferentia2 / Trainium) device plugin. See plugins/neuron/README.md.

The probe reads ``/dev``, ``/sys`` and package metadata only; optimum-neuron is
imported inside :mod:`llmcore_neuron.device` when a compile or a serve starts.
"""

from __future__ import annotations

from typing import Any

from llmcore import hookimpl
from llmcore.capabilities import KV_FIXED_SLOTS, Capabilities, DeviceProbe
from llmcore_neuron import __version__, sdk

LLMCORE_CONTRACT_VERSION = 1
NEURON_SCORE = 90
#: Kept for callers of the first release: Inferentia2's 16 GiB per NeuronCore.
MEMORY_PER_CORE = sdk.TARGETS["inf2"].memory_per_core
INSTALL_HINT = sdk.INSTALL_HINT


def capabilities(target: str = sdk.DEFAULT_TARGET, num_cores: int | None = None) -> Capabilities:
    """What Neuron offers for ``target``; ``num_cores`` defaults to its largest instance."""
    t = sdk.TARGETS[target]
    cores = num_cores or t.max_cores
    notes = [
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


def probe(config: dict[str, Any] | None = None) -> DeviceProbe:
    config = config or {}
    target = sdk.resolve_target(config.get("neuron_target"))
    devices = sdk.neuron_devices()
    cores = len(devices) * sdk.TARGETS[target].cores_per_device if devices else None
    caps = capabilities(target, cores)

    def unusable(reason: str) -> DeviceProbe:
        return DeviceProbe("neuron", 0, caps, reason=reason, hint=INSTALL_HINT,
                           description=f"target {target}", plugin_version=__version__)

    if not devices:
        return unusable("no Neuron device (/dev/neuron* not found)")
    if sdk.runtime_library() is None:
        return unusable(f"Neuron runtime library not found ({sdk.RUNTIME_LIBRARIES[0]})")
    missing = sdk.missing_sdk()
    if missing:
        return unusable(f"Neuron SDK not installed ({', '.join(missing)} missing)")
    t = sdk.TARGETS[target]
    return DeviceProbe(
        "neuron", NEURON_SCORE, caps, plugin_version=__version__,
        description=f"{len(devices)} Neuron device(s), {cores} NeuronCores ({target}, "
                    f"{t.memory_per_core / 2**30:.0f} GiB each)",
    )


@hookimpl
def llmcore_probe(config):
    return probe(config)


@hookimpl
def llmcore_create_device(name, config):
    if name != "neuron":
        return None
    from llmcore_neuron.device import NeuronDevice

    extra = dict(getattr(config, "extra", None) or {})
    return NeuronDevice(probe(extra), config)
