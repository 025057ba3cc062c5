"""CPU plugin: registered through the ``llmcore.plugins`` entry point like any third party.

The probe reads ``/proc/cpuinfo`` and ``/proc/meminfo`` only (no torch import),
so ``llmcore devices`` answers instantly; the device itself (llmcore_cpu.device) imports torch
and is loaded only when an engine or a compile asks for it. Decode paths: plugins/cpu/README.md.
"""

from __future__ import annotations

import os
import platform

from llmcore import hookimpl
from llmcore.capabilities import KV_PAGED, Capabilities, DeviceProbe
from llmcore.quantization import available_names
from llmcore_cpu import __version__
from llmcore_cpu.cpuinfo import cpu_flags, memory_bytes
from llmcore_cpu.toolchain import find_compiler, isa_setting, native_setting

LLMCORE_CONTRACT_VERSION = 1

# Low on purpose: any usable accelerator outranks the CPU in automatic selection.
CPU_SCORE = 10


def fast_bf16() -> bool:
    """bf16 matmuls are fast (AVX512-BF16 or AMX); otherwise float32 is the default."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags) or platform.machine() == "arm64"


def _native_note() -> str:
    """Whether the native decode step can be built here (a cheap check: no build, no torch)."""
    if native_setting() == "off":
        return "decode: torch path (native step disabled by LLMCORE_CPU_NATIVE=0)"
    cxx = find_compiler()
    if not cxx:
        return "decode: torch path (no C++ compiler for the native step; install g++)"
    flags = cpu_flags()
    try:
        isa = isa_setting()
    except ValueError as exc:
        return f"decode: torch path ({exc})"
    if isa == "avx2" and {"avx2", "fma"} <= flags:
        flags = flags - {"avx512f"}
    elif isa == "portable":
        flags = set()
    if "avx512f" in flags:
        kernels = "AVX-512"
    elif {"avx2", "fma"} <= flags:
        kernels = "AVX2"
    elif native_setting() == "force":
        kernels = "portable loops, forced by LLMCORE_CPU_NATIVE=1"
    else:
        return "decode: torch path (no AVX-512 or AVX2+FMA for the native step; LLMCORE_CPU_NATIVE=1 forces it)"
    return f"decode: native C++ step, {kernels} kernels (built with {os.path.basename(cxx)} at first use; docs/cpu.md)"


def capabilities() -> Capabilities:
    bf16 = fast_bf16()
    return Capabilities(
        dtypes=("float32", "bfloat16"),
        default_dtype="bfloat16" if bf16 else "float32",
        # the registry's methods for "cpu" whose requirements are importable (find_spec only)
        quantization=available_names("cpu"),
        kv_layout=KV_PAGED,
        needs_compile=False,
        static_shapes=False,
        memory_bytes=memory_bytes(),
        device_count=1,
        # 8-token blocks: half the KV memory left empty in each sequence's last block at 16, at no
        # measured decode cost (docs/benchmarks.md, "KV waste at peak")
        default_block_size=8,
        tensor_parallel=True,  # at run time, ranks sharing the cores (gloo; for testing)
        notes=(() if bf16 else ("no AVX512-BF16/AMX: bfloat16 works but float32 is faster",)) + (_native_note(),),
    )


@hookimpl
def llmcore_probe(config):
    cores = os.cpu_count() or 1
    return DeviceProbe(
        name="cpu",
        score=CPU_SCORE,
        capabilities=capabilities(),
        description=f"{cores}-core {platform.machine()} CPU",
        plugin_version=__version__,
    )


@hookimpl
def llmcore_create_device(name, config):
    if name != "cpu":
        return None
    # deferred: the device imports torch, which `llmcore devices` and the probe must not pay for
    from llmcore_cpu.device import CpuDevice

    return CpuDevice(llmcore_probe(config={}), config)
