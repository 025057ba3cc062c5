"""AWS Neuron (Inferentia2 / Trainium) device plugin. See plugins/neuron/README.md.

The probe reads ``/dev``, ``/sys`` and package metadata only; optimum-neuron is
imported inside :mod:`llmcore_neuron.device` when a compile or a serve starts.
Imports run one way: plugin -> device -> planning -> sdk.
"""

from __future__ import annotations

from typing import Any

from llmcore import hookimpl
from llmcore.capabilities import DeviceProbe
from llmcore.compiled.vendor import UNVERIFIED
from llmcore_neuron import __version__, sdk
from llmcore_neuron.device import NeuronDevice
from llmcore_neuron.sdk import capabilities

LLMCORE_CONTRACT_VERSION = 1
NEURON_SCORE = 90
INSTALL_HINT = sdk.INSTALL_HINT


def probe(config: dict[str, Any] | None = None) -> DeviceProbe:
    config = config or {}
    target = sdk.resolve_target(config.get("neuron_target"))
    devices = sdk.neuron_devices()
    cores = len(devices) * sdk.TARGETS[target].cores_per_device if devices else None
    caps = capabilities(target, cores)

    def unusable(reason: str) -> DeviceProbe:
        return DeviceProbe("neuron", 0, caps, reason=f"{reason}; {UNVERIFIED}", hint=INSTALL_HINT,
                           description=f"target {target}, {UNVERIFIED}", plugin_version=__version__)

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
                    f"{t.memory_per_core / 2**30:.0f} GiB each); {UNVERIFIED}",
    )


@hookimpl
def llmcore_probe(config):
    return probe(config)


@hookimpl
def llmcore_create_device(name, config):
    if name != "neuron":
        return None
    extra = dict(getattr(config, "extra", None) or {})
    return NeuronDevice(probe(extra), config)
