"""The cuda plugin against the device conformance suite.

The probe, capability and device checks run everywhere. The runner checks run
on an NVIDIA GPU; without one, with ``TRITON_INTERPRET=1`` (as CI sets it),
they run the same :class:`~llmcore_cuda.runner.CudaModelRunner` on the CPU,
its Triton kernels through Triton's interpreter; otherwise they skip with the
probe's reason.
"""

import dataclasses
import os

import pytest

from llmcore.testing.conformance import DeviceConformance


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.gpu
class TestCudaConformance(DeviceConformance):
    device_name = "cuda"
    plugin_module = "llmcore_cuda.plugin"
    requires_device = True
    # with a driver present the probe asks torch for the GPU's properties
    probe_may_import = ("torch", "numpy")

    @pytest.fixture
    def usable(self, probe) -> None:
        if probe.usable:
            return
        if not interpreted():
            pytest.skip(f"cuda cannot run here: {probe.reason} (TRITON_INTERPRET=1 runs these checks on "
                        "the CPU through Triton's interpreter)")
        pytest.importorskip("triton")

    def create_runner(self, device, model_config, tiny_model, run_dtype):
        if device.probe.usable:
            return super().create_runner(device, model_config, tiny_model, run_dtype)
        from llmcore_cuda.testing import cpu_runner

        # decode "graphs" (replayed eagerly here) for the batch sizes the checks run, not up to 256
        config = dataclasses.replace(device.config, max_num_seqs=self.batch_size)
        return cpu_runner(model_config, tiny_model, config, run_dtype, block_size=device.block_size,
                          max_model_len=self.max_seq_len, eos_token_ids=model_config.eos_token_ids)
