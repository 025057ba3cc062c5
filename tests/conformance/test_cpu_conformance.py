"""The cpu plugin against the device conformance suite (eager torch over a paged KV cache)."""

from llmcore.testing.conformance import DeviceConformance


class TestCpuConformance(DeviceConformance):
    device_name = "cpu"
    plugin_module = "llmcore_cpu.plugin"

    def test_device_plan_defaults_to_plan_static(self, device, model_config):
        """Device.plan (what `llmcore compile` asks a device for) is plan_static unless overridden."""
        from llmcore.compiled.plan import plan_static

        settings = dict(batch_size=2, max_seq_len=64, dtype="float32")
        assert device.plan(model_config, **settings) == plan_static(model_config, device.capabilities, "cpu",
                                                                   **settings)
