"""CUDA device: the shared torch runner on a GPU, KV sized from measured free memory."""

from __future__ import annotations

import logging

from llmcore.device import Device

log = logging.getLogger("llmcore.cuda")


class CudaDevice(Device):
    def create_runner(self, model_config, folder, dtype, eos_token_ids, max_model_len):
        import torch

        from llmcore.runtime.attention import TorchPagedAttention
        from llmcore.runtime.runner import TorchModelRunner

        return TorchModelRunner(
            model_config, folder, torch.device("cuda", 0), dtype, TorchPagedAttention(),
            block_size=self.config.block_size, max_model_len=max_model_len,
            eos_token_ids=eos_token_ids, seed=self.config.seed, progress=self.config.progress,
        )

    def kv_cache_bytes(self, runner):
        import torch

        free, total = torch.cuda.mem_get_info()
        budget = int(total * self.config.gpu_memory_utilization) - (total - free)
        log.info("CUDA memory: %.1f GiB free of %.1f GiB; KV budget %.1f GiB",
                 free / 2**30, total / 2**30, max(budget, 0) / 2**30)
        return max(budget, 0)
