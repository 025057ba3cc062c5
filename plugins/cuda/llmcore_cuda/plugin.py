"""CUDA plugin probe: says plainly why CUDA cannot run when it cannot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmcore import hookimpl
from llmcore.capabilities import KV_PAGED, Capabilities, DeviceProbe
from llmcore.quantization import available_names
from llmcore_cuda import __version__

LLMCORE_CONTRACT_VERSION = 1
CUDA_SCORE = 100

INSTALL_HINT = "Install a CUDA build of torch (pip install 'llmcore[cuda]') on a machine with an NVIDIA GPU and driver"


def _unusable(reason: str, hint: str = INSTALL_HINT) -> DeviceProbe:
    return DeviceProbe(
        name="cuda", score=0, reason=reason, hint=hint, plugin_version=__version__,
        capabilities=Capabilities(dtypes=("float16", "bfloat16", "float32"), default_dtype="bfloat16",
                                  tensor_parallel=True),
    )


def _nvml_gpu():
    """(name, total bytes, (major, minor), count) through NVML, or None.

    NVML answers without creating a CUDA context, so the probe stays cheap and
    leaves nothing behind (a CUDA context creates the driver's ~/.nv cache).
    """
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count < 1:
                return None
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
            cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            return name, total, cc, count
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


@hookimpl
def llmcore_probe(config):
    # cheap checks first: no driver means no need to import torch at all
    if not Path("/proc/driver/nvidia/version").exists() and not Path("/dev/nvidiactl").exists():
        return _unusable("no NVIDIA driver found (/proc/driver/nvidia/version and /dev/nvidiactl missing)")
    if importlib.util.find_spec("torch") is None:
        return _unusable("torch is not installed")
    import torch

    if torch.version.cuda is None:
        return _unusable(f"torch {torch.__version__} is a CPU-only build")
    gpu = _nvml_gpu()
    if gpu is not None:
        name, total, (major, minor), count = gpu
        sms = None
    else:
        if not torch.cuda.is_available():
            return _unusable("torch found no usable CUDA device (driver/runtime mismatch or no GPU visible)")
        props = torch.cuda.get_device_properties(0)
        name, total, major, minor = props.name, props.total_memory, props.major, props.minor
        count, sms = torch.cuda.device_count(), props.multi_processor_count
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
            # the registry's methods for "cuda" whose requirements are importable here (find_spec
            # only): eetq, int4, awq need triton; bnb-int8, bnb-nf4 need bitsandbytes
            quantization=available_names("cuda"),
            memory_bytes=total, device_count=count,
            tensor_parallel=True,  # at run time over up to device_count GPUs (llmcore.parallel)
            notes=tuple(notes),
        ),
        description=(f"{name} (sm_{major}{minor}, {total / 2**30:.0f} GiB"
                     + (f", {sms} SMs)" if sms else ")")),
        plugin_version=__version__,
    )


@hookimpl
def llmcore_create_device(name, config):
    if name != "cuda":
        return None
    from llmcore_cuda.device import CudaDevice

    return CudaDevice(llmcore_probe(config={}), config)
