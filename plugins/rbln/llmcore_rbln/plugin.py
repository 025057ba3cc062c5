"""Rebellions ATOM / REBEL (RBLN) device plugin. See plugins/rbln/README.md.

The probe reads ``/dev`` and package metadata only; optimum-rbln (and the
``rebel`` compiler it loads) is imported inside :mod:`llmcore_rbln.device`.
"""

from __future__ import annotations

from typing import Any

from llmcore import hookimpl
from llmcore.capabilities import KV_FIXED_SLOTS, Capabilities, DeviceProbe
from llmcore_rbln import __version__, sdk
from llmcore_rbln.quantization import METHODS

LLMCORE_CONTRACT_VERSION = 1
RBLN_SCORE = 90
#: Kept for callers of the first release: one ATOM card's 16 GiB.
MEMORY_PER_DEVICE = 16 << 30
INSTALL_HINT = sdk.INSTALL_HINT


def capabilities(npu: str = sdk.DEFAULT_NPU, num_devices: int | None = None) -> Capabilities:
    """What ``npu`` offers; ``num_devices`` defaults to a full server of cards when none is seen."""
    fam = sdk.family(npu)
    notes = [
        "batch slots, max sequence length and decode batch sizes are fixed at compile time "
        "(llmcore compile --device rbln)",
        f"KV block size = max_seq_len (eager attention, up to {fam.max_eager_seq_len}) or a "
        f"flash-attention partition of {fam.min_partition_len}-{fam.max_partition_len} tokens",
        "quantization needs a checkpoint pre-quantized for RBLN (weight scales included)",
    ]
    if num_devices is None:
        notes.append(f"no RBLN device here: planning for {npu} ({fam.name}), up to "
                     f"{sdk.DEFAULT_PLANNING_DEVICES} cards")
    return Capabilities(
        dtypes=("float16", "bfloat16", "float32"),
        default_dtype="float16",
        quantization=tuple(METHODS),
        kv_layout=KV_FIXED_SLOTS,
        needs_compile=True,
        static_shapes=True,
        memory_bytes=fam.memory_bytes,
        device_count=num_devices or sdk.DEFAULT_PLANNING_DEVICES,
        tensor_parallel=True,
        notes=tuple(notes),
    )


def probe(config: dict[str, Any] | None = None) -> DeviceProbe:
    config = config or {}
    npu, _ = sdk.resolve_npu(config.get("rbln_npu"))
    devices = sdk.rbln_devices()
    caps = capabilities(npu, len(devices) or None)

    def unusable(reason: str) -> DeviceProbe:
        return DeviceProbe("rbln", 0, caps, reason=reason, hint=INSTALL_HINT,
                           description=f"target {npu}", plugin_version=__version__)

    if not devices:
        return unusable("no RBLN device (/dev/rbln* not found; is the RBLN driver installed and loaded?)")
    missing = sdk.missing_sdk()
    if missing:
        return unusable(f"RBLN SDK not installed ({', '.join(missing)} missing)")
    fam = sdk.family(npu)
    return DeviceProbe(
        "rbln", RBLN_SCORE, caps, plugin_version=__version__,
        description=f"{len(devices)} RBLN device(s) ({npu}, {fam.name}, "
                    f"{fam.memory_bytes / 2**30:.1f} GiB each)",
    )


@hookimpl
def llmcore_probe(config):
    return probe(config)


@hookimpl
def llmcore_create_device(name, config):
    if name != "rbln":
        return None
    from llmcore_rbln.device import RblnDevice

    extra = dict(getattr(config, "extra", None) or {})
    return RblnDevice(probe(extra), config)
