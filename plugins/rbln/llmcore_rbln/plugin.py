"""Rebellions ATOM (RBLN) plugin probe. See plugins/rbln/README.md."""

from __future__ import annotations

import glob
import importlib.util

from llmcore import hookimpl
from llmcore.capabilities import KV_FIXED_SLOTS, Capabilities, DeviceProbe
from llmcore_rbln import __version__

LLMCORE_CONTRACT_VERSION = 1
RBLN_SCORE = 90
#: RBLN ATOM: 16 GiB device memory per chip.
MEMORY_PER_DEVICE = 16 << 30
INSTALL_HINT = (
    "Run on a host with a Rebellions ATOM card and its driver; install the RBLN compiler "
    "('rebel-compiler', from Rebellions' package index) and pip install 'llmcore[rbln]'"
)


def capabilities(num_devices: int = 1) -> Capabilities:
    return Capabilities(
        dtypes=("float16", "bfloat16", "float32"),
        default_dtype="float16",
        quantization=(),
        kv_layout=KV_FIXED_SLOTS,
        needs_compile=True,
        static_shapes=True,
        memory_bytes=MEMORY_PER_DEVICE,
        device_count=num_devices,
        tensor_parallel=True,
        notes=("batch size and max sequence length are fixed at compile time",),
    )


@hookimpl
def llmcore_probe(config):
    devices = sorted(glob.glob("/dev/rbln*"))
    caps = capabilities(max(len(devices), 1))
    if not devices:
        return DeviceProbe("rbln", 0, caps, reason="no RBLN device (/dev/rbln* not found)",
                           hint=INSTALL_HINT, plugin_version=__version__)
    missing = [m for m in ("rebel", "optimum.rbln") if not _importable(m)]
    if missing:
        return DeviceProbe("rbln", 0, caps, reason=f"RBLN SDK not installed ({', '.join(missing)} missing)",
                           hint=INSTALL_HINT, plugin_version=__version__)
    return DeviceProbe("rbln", RBLN_SCORE, caps, description=f"{len(devices)} RBLN device(s)",
                       plugin_version=__version__)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
