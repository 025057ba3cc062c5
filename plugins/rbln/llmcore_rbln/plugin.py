"""Rebellions ATOM / REBEL (RBLN) device plugin. See plugins/rbln/README.md.

The probe reads ``/dev`` and package metadata only; optimum-rbln (and the
``rebel`` compiler it loads) is imported inside :mod:`llmcore_rbln.device`.
Imports run one way: plugin -> device -> planning -> sdk -> quantization.
"""

from __future__ import annotations

from typing import Any

from llmcore import hookimpl
from llmcore.capabilities import DeviceProbe
from llmcore.compiled.vendor import UNVERIFIED
from llmcore_rbln import __version__, sdk
from llmcore_rbln.device import RblnDevice
from llmcore_rbln.sdk import capabilities

LLMCORE_CONTRACT_VERSION = 1
RBLN_SCORE = 90
INSTALL_HINT = sdk.INSTALL_HINT


def probe(config: dict[str, Any] | None = None) -> DeviceProbe:
    config = config or {}
    npu, _ = sdk.resolve_npu(config.get("rbln_npu"))
    devices = sdk.rbln_devices()
    caps = capabilities(npu, len(devices) or None)

    def unusable(reason: str) -> DeviceProbe:
        return DeviceProbe("rbln", 0, caps, reason=f"{reason}; {UNVERIFIED}", hint=INSTALL_HINT,
                           description=f"target {npu}, {UNVERIFIED}", plugin_version=__version__)

    if not devices:
        return unusable("no RBLN device (/dev/rbln* not found; is the RBLN driver installed and loaded?)")
    missing = sdk.missing_sdk()
    if missing:
        return unusable(f"RBLN SDK not installed ({', '.join(missing)} missing)")
    fam = sdk.family(npu)
    return DeviceProbe(
        "rbln", RBLN_SCORE, caps, plugin_version=__version__,
        description=f"{len(devices)} RBLN device(s) ({npu}, {fam.name}, "
                    f"{fam.memory_bytes / 2**30:.1f} GiB each); {UNVERIFIED}",
    )


@hookimpl
def llmcore_probe(config):
    return probe(config)


@hookimpl
def llmcore_create_device(name, config):
    if name != "rbln":
        return None
    extra = dict(getattr(config, "extra", None) or {})
    return RblnDevice(probe(extra), config)
