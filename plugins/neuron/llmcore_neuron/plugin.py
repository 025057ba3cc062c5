"""AWS Neuron (Inferentia2 / Trainium) plugin probe. See plugins/neuron/README.md."""

from __future__ import annotations

import glob
import importlib.util

from llmcore import hookimpl
from llmcore.capabilities import KV_FIXED_SLOTS, Capabilities, DeviceProbe
from llmcore_neuron import __version__

LLMCORE_CONTRACT_VERSION = 1
NEURON_SCORE = 90
#: Inferentia2: 32 GiB HBM per chip, 2 NeuronCores per chip -> 16 GiB per core.
MEMORY_PER_CORE = 16 << 30
INSTALL_HINT = (
    "Run on an inf2/trn1 instance with the Neuron driver and SDK; install with "
    "pip install 'llmcore[neuron]' --extra-index-url https://pip.repos.neuron.amazonaws.com"
)


def capabilities(num_cores: int = 2) -> Capabilities:
    return Capabilities(
        dtypes=("bfloat16", "float16", "float32"),
        default_dtype="bfloat16",
        quantization=(),
        kv_layout=KV_FIXED_SLOTS,
        needs_compile=True,
        static_shapes=True,
        memory_bytes=MEMORY_PER_CORE,
        device_count=num_cores,
        tensor_parallel=True,
        notes=("batch size and sequence length are fixed at compile time",),
    )


@hookimpl
def llmcore_probe(config):
    devices = sorted(glob.glob("/dev/neuron*"))
    caps = capabilities(max(len(devices) * 2, 2))
    if not devices:
        return DeviceProbe("neuron", 0, caps, reason="no Neuron device (/dev/neuron* not found)",
                           hint=INSTALL_HINT, plugin_version=__version__)
    missing = [m for m in ("torch_neuronx", "optimum.neuron") if not _importable(m)]
    if missing:
        return DeviceProbe("neuron", 0, caps, reason=f"Neuron SDK not installed ({', '.join(missing)} missing)",
                           hint=INSTALL_HINT, plugin_version=__version__)
    return DeviceProbe("neuron", NEURON_SCORE, caps, description=f"{len(devices)} Neuron device(s)",
                       plugin_version=__version__)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
