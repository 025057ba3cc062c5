"""The CPU device: which decode path a runner gets, the KV budget, and compiled mode.

Which path runs when, and how to turn each off: plugins/cpu/README.md. In short, a dynamic
engine runs prefill through the model's torch forward and decode batches through the native
C++ step (llmcore_cpu.native) where it covers the model, else through the same torch forward
(bf16 weights prepacked for oneDNN, llmcore_cpu.packed_linear); ``Engine(compiled=...)`` serves
an ahead-of-time compiled entry (llmcore_cpu.compiled).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from llmcore.device import Device
from llmcore.runtime.attention import TorchPagedAttention
from llmcore.runtime.runner import TorchModelRunner
from llmcore_cpu import native
from llmcore_cpu.compiled import compile_graphs, key_inputs
from llmcore_cpu.cpuinfo import memory_bytes
from llmcore_cpu.packed_linear import pack_model
from llmcore_cpu.static_runner import CpuStaticRunner

log = logging.getLogger("llmcore.cpu")

COMPILE_DECODE_REMOVED = (
    "compile_decode (--compile-decode) is deprecated and ignored: the CPU's Inductor-compiled decode step "
    "was removed, because the native decode step (the default) is faster on every measured workload "
    "(docs/benchmarks.md). Drop the option; for a compiled, cached artifact use "
    "`llmcore compile --device cpu` and Engine(compiled=KEY)")


class CpuDevice(Device):
    # tensor parallelism over processes on the same CPU (gloo): for testing, not for speed
    tensor_parallel_backend = "gloo"

    def tensor_parallel_limit(self):
        return os.cpu_count() or 1, "CPU cores (at least one thread per rank)"

    def threads(self) -> int:
        return self.config.num_threads or os.cpu_count() or 1

    def create_runner(self, model_config, folder, dtype, eos_token_ids, max_model_len, tp=None):
        threads = self.threads()
        torch.set_num_threads(threads)
        runner = TorchModelRunner(
            model_config, folder, torch.device("cpu"), dtype, TorchPagedAttention(),
            block_size=self.block_size, max_model_len=max_model_len,
            eos_token_ids=eos_token_ids, seed=self.config.seed, progress=self.config.progress,
            quantization=self.config.quantization, tp=tp,
        )
        if self.config.compile_decode:
            warnings.warn(COMPILE_DECODE_REMOVED, FutureWarning, stacklevel=2)
        if self.config.enforce_eager:
            log.info("decode: torch path (enforce_eager)")
            return runner
        if self.config.native_decode:
            try:
                native.install(runner, threads)
                log.info("decode: native step (%s)", ", ".join(k for k, v in native.features().items() if v)
                         or "portable kernels")
                return runner  # its projections are packed into panels: nothing for oneDNN to prepack
            except native.NativeUnavailable as exc:
                log.info("decode: torch path (native step unavailable: %s)", exc)
        else:
            log.info("decode: torch path (native_decode=False)")
        if dtype == "bfloat16":
            quantized_head = runner.model.logits_proj  # set by a quantization; packing must not replace it
            pack_model(runner.model, batch=min(self.config.max_num_seqs, 64))
            if quantized_head is not None:
                runner.model.logits_proj = quantized_head
        return runner

    def kv_cache_bytes(self, runner):
        avail = memory_bytes() or (8 << 30)
        return int(min(2 << 30, avail * 0.25))

    # ------------------------------------------- compiled mode (llmcore_cpu.compiled)

    def compile_key_inputs(self, plan):
        return key_inputs()

    def compile(self, model_path, model_config, plan, out_dir, progress=True):
        torch.set_num_threads(self.threads())
        return compile_graphs(Path(model_path), model_config, plan, Path(out_dir), progress=progress)

    def create_static_runner(self, artifact_dir, plan, model_config, model_path, eos_token_ids):
        torch.set_num_threads(self.threads())
        return CpuStaticRunner(
            Path(artifact_dir), plan, model_config, Path(model_path), eos_token_ids,
            block_size=self.block_size, seed=self.config.seed,
            progress=self.config.progress,
        )
