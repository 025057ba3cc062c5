"""CUDA device: Triton paged attention, CUDA-graph decode, KV sized from measured memory."""

from __future__ import annotations

import importlib.util
import logging

from llmcore.device import Device

log = logging.getLogger("llmcore.cuda")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class CudaDevice(Device):
    tensor_parallel_backend = "nccl"  # llmcore.parallel: rank r runs on cuda:r

    def tensor_parallel_limit(self):
        import torch

        return torch.cuda.device_count(), "GPUs (torch.cuda.device_count())"

    def create_runner(self, model_config, folder, dtype, eos_token_ids, max_model_len, tp=None):
        import torch

        dev = torch.device("cuda", tp.rank if tp is not None else 0)  # rank r runs on GPU r
        torch.cuda.set_device(dev)
        if not triton_available():
            from llmcore.runtime.attention import TorchPagedAttention
            from llmcore.runtime.runner import TorchModelRunner

            log.warning("triton is not installed: CUDA runs the torch reference attention, eager "
                        "(slow). Install it with: pip install 'llmcore[cuda]'")
            return TorchModelRunner(
                model_config, folder, dev, dtype, TorchPagedAttention(),
                block_size=self.block_size, max_model_len=max_model_len,
                eos_token_ids=eos_token_ids, seed=self.config.seed,
                quantization=self.config.quantization, tp=tp,
            )
        from llmcore_cuda.runner import CudaModelRunner

        return CudaModelRunner(
            model_config, folder, dev, dtype, block_size=self.block_size,
            max_model_len=max_model_len, eos_token_ids=eos_token_ids, engine_config=self.config,
            seed=self.config.seed, quantization=self.config.quantization, tp=tp,
        )

    def kv_cache_bytes(self, runner):
        import torch

        util = self.config.gpu_memory_utilization
        if hasattr(runner, "profile_kv_budget"):
            return runner.profile_kv_budget(util)
        free, total = torch.cuda.mem_get_info()
        budget = int(total * util) - (total - free)
        log.info("CUDA memory: %.1f GiB free of %.1f GiB; KV budget %.1f GiB",
                 free / 2**30, total / 2**30, max(budget, 0) / 2**30)
        return max(budget, 0)
