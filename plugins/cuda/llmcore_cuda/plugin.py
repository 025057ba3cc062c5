"""CUDA plugin probe: says plainly why CUDA cannot run when it cannot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmcore import hookimpl
from llmcore.capabilities import KV_PAGED, Capabilities, DeviceProbe
from llmcore_cuda import __version__

LLMCORE_CONTRACT_VERSION = 1
CUDA_SCORE = 100

INSTALL_HINT = "Install a CUDA build of torch (pip install 'llmcore[cuda]') on a machine with an NVIDIA GPU and driver"


def _unusable(reason: str, hint: str = INSTALL_HINT) -> DeviceProbe:
    return DeviceProbe(
        name="cuda", score=0, reason=reason, hint=hint, plugin_version=__version__,
        capabilities=Capabilities(dtypes=("float16", "bfloat16", "float32"), default_dtype="bfloat16"),
    )


@hookimpl
def llmcore_probe(config):
    # cheap checks first: no driver means no need to import torch at all
    if not Path("/proc/driver/nvidia/version").exists() and not Path("/dev/nvidiactl").exists():
        return _unusable("no NVIDIA driver found (/proc/driver/nvidia/version and /dev/nvidiactl missing)")
    if importlib.util.find_spec("torch") is None:
        return _unusable("torch is not installed")
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return _unusable(f"torch {torch.__version__} is a CPU-only build")
        return _unusable("torch found no usable CUDA device (driver/runtime mismatch or no GPU visible)")
    props = torch.cuda.get_device_properties(0)
    major, minor = props.major, props.minor
    dtypes = ("bfloat16", "float16", "float32") if major >= 8 else ("float16", "float32")
    notes = []
    if importlib.util.find_spec("triton") is not None:
        notes.append("attention: Triton paged kernels (decode split-K, varlen prefill); "
                     "decode CUDA graphs at batch buckets 1..256")
    else:
        notes.append("triton not installed: torch reference attention, no CUDA graphs "
                     "(pip install 'llmcore[cuda]')")
    if (major, minor) >= (8, 9):
        notes.append(f"fp8 hardware present (sm_{major}{minor}); fp8 weights/KV not supported yet")
    return DeviceProbe(
        name="cuda",
        score=CUDA_SCORE,
        capabilities=Capabilities(
            dtypes=dtypes, default_dtype=dtypes[0], kv_layout=KV_PAGED,
            quantization=(),  # bnb/AWQ/EETQ arrive with their own issue
            memory_bytes=props.total_memory, device_count=torch.cuda.device_count(),
            tensor_parallel=False,  # not implemented yet, whatever the GPU count
            notes=tuple(notes),
        ),
        description=(f"{props.name} (sm_{major}{minor}, {props.total_memory / 2**30:.0f} GiB, "
                     f"{props.multi_processor_count} SMs)"),
        plugin_version=__version__,
    )


@hookimpl
def llmcore_create_device(name, config):
    if name != "cuda":
        return None
    from llmcore_cuda.device import CudaDevice

    return CudaDevice(llmcore_probe(config={}), config)
