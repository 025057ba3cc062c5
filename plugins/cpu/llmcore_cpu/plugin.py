"""CPU plugin: registered through the ``llmcore.plugins`` entry point like any third party.

The probe reads ``/proc/cpuinfo`` and ``/proc/meminfo`` only (no torch import),
so ``llmcore devices`` answers instantly.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

from llmcore import hookimpl
from llmcore.capabilities import KV_PAGED, Capabilities, DeviceProbe
from llmcore.device import Device
from llmcore.quantization import available_names
from llmcore_cpu import __version__

log = logging.getLogger("llmcore.cpu")

LLMCORE_CONTRACT_VERSION = 1

# Low on purpose: any usable accelerator outranks the CPU in automatic selection.
CPU_SCORE = 10


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fast_bf16() -> bool:
    """bf16 matmuls are fast (AVX512-BF16 or AMX); otherwise float32 is the default."""
    flags = _cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags) or platform.machine() == "arm64"


def _native_note() -> str:
    """Whether the native decode step can be built here (a cheap check: no build, no torch)."""
    from llmcore_cpu.toolchain import find_compiler, native_setting

    if native_setting() == "off":
        return "decode: torch path (native step disabled by LLMCORE_CPU_NATIVE=0)"
    cxx = find_compiler()
    if not cxx:
        return "decode: torch path (no C++ compiler for the native step; install g++)"
    return f"decode: native C++ step (built with {os.path.basename(cxx)} at first use; docs/cpu.md)"


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
        memory_bytes=_memory_bytes(),
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


class CpuDevice(Device):
    # tensor parallelism over processes on the same CPU (gloo): for testing, not for speed
    tensor_parallel_backend = "gloo"

    def tensor_parallel_limit(self):
        return os.cpu_count() or 1, "CPU cores (at least one thread per rank)"

    def create_runner(self, model_config, folder, dtype, eos_token_ids, max_model_len, tp=None):
        import torch

        from llmcore.runtime.attention import TorchPagedAttention
        from llmcore.runtime.runner import TorchModelRunner

        threads = self.config.num_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        runner = TorchModelRunner(
            model_config, folder, torch.device("cpu"), dtype, TorchPagedAttention(),
            block_size=self.block_size, max_model_len=max_model_len,
            eos_token_ids=eos_token_ids, seed=self.config.seed, progress=self.config.progress,
            quantization=self.config.quantization, tp=tp,
        )
        if self.config.compile_decode and not self.config.enforce_eager:
            from llmcore_cpu.compiled_decode import install

            install(runner)  # Inductor prepacks the weights itself: no packed modules to trace
            return runner
        if self.config.native_decode and not self.config.enforce_eager:
            from llmcore_cpu import native

            try:
                native.install(runner, threads)
                log.info("decode: native step (%s)", ", ".join(k for k, v in native.features().items() if v)
                         or "portable kernels")
                return runner  # reads the plain weights in place: nothing to prepack
            except native.NativeUnavailable as exc:
                log.info("decode: torch path (native step unavailable: %s)", exc)
        if dtype == "bfloat16" and not self.config.enforce_eager:
            from llmcore_cpu.packed_linear import pack_model

            quantized_head = runner.model.logits_proj  # set by a quantization; packing must not replace it
            pack_model(runner.model, batch=min(self.config.max_num_seqs, 64))
            if quantized_head is not None:
                runner.model.logits_proj = quantized_head
        return runner

    def kv_cache_bytes(self, runner):
        avail = _memory_bytes() or (8 << 30)
        return int(min(2 << 30, avail * 0.25))

    # ------------------------------------------- compiled mode (llmcore_cpu.compiled)

    def compile_key_inputs(self, plan):
        from llmcore_cpu.compiled import key_inputs

        return key_inputs()

    def compile(self, model_path, model_config, plan, out_dir, progress=True):
        import torch

        from llmcore_cpu.compiled import compile_graphs, default_threads

        torch.set_num_threads(default_threads(self.config))
        return compile_graphs(Path(model_path), model_config, plan, Path(out_dir), progress=progress)

    def create_static_runner(self, artifact_dir, plan, model_config, model_path, eos_token_ids):
        import torch

        from llmcore_cpu.compiled import CpuStaticRunner, default_threads

        torch.set_num_threads(default_threads(self.config))
        return CpuStaticRunner(
            Path(artifact_dir), plan, model_config, Path(model_path), eos_token_ids,
            block_size=self.block_size, seed=self.config.seed,
            progress=self.config.progress,
        )


@hookimpl
def llmcore_create_device(name, config):
    if name != "cpu":
        return None
    return CpuDevice(llmcore_probe(config={}), config)
