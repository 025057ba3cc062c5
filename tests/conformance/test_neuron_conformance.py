"""The neuron plugin against the device conformance suite, through the optimum-neuron stand-in.

No Neuron hardware or SDK here: the stand-in (tests/neuron/standin.py) plays the
exported model with transformers on the CPU, so this checks the plugin's side
of the contract (plan, export calls, slots, positions, seq_ids), not the chip.
"""

import pytest

from llmcore.testing.conformance import DeviceConformance
from tests.neuron import standin


class TestNeuronConformance(DeviceConformance):
    device_name = "neuron"
    plugin_module = "llmcore_neuron.plugin"

    @pytest.fixture(autouse=True)
    def optimum_neuron(self, monkeypatch):
        return standin.install(monkeypatch)
