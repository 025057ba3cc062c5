"""The rbln plugin against the device conformance suite, through the optimum-rbln stand-in.

No RBLN hardware or compiler here: the stand-in (tests/rbln/standin.py) plays the
NPU with transformers on the CPU, its KV cache paged through the block tables
the plugin passes, so this checks the plugin's side of the contract, not the chip.
"""

import pytest

from llmcore.testing.conformance import DeviceConformance
from tests.rbln import standin


class TestRblnConformance(DeviceConformance):
    device_name = "rbln"
    plugin_module = "llmcore_rbln.plugin"

    @pytest.fixture(autouse=True)
    def optimum_rbln(self, monkeypatch):
        return standin.install(monkeypatch)
