"""The cpu plugin against the device conformance suite (eager torch over a paged KV cache)."""

from llmcore.testing.conformance import DeviceConformance


class TestCpuConformance(DeviceConformance):
    device_name = "cpu"
    plugin_module = "llmcore_cpu.plugin"
