"""The cuda plugin against the device conformance suite.

The probe, capability and device checks run everywhere; the runner checks skip
with the probe's reason on a machine without an NVIDIA GPU.
"""

import pytest

from llmcore.testing.conformance import DeviceConformance


@pytest.mark.gpu
class TestCudaConformance(DeviceConformance):
    device_name = "cuda"
    plugin_module = "llmcore_cuda.plugin"
    requires_device = True
    # with a driver present the probe asks torch for the GPU's properties
    probe_may_import = ("torch", "numpy")
