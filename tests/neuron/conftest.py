"""Fixtures for the neuron plugin's tests: the optimum-neuron stand-in, a tiny model, a device."""

from __future__ import annotations

import pytest

from llmcore.config import EngineConfig
from llmcore.testing.conformance import shared_tiny_model
from tests.neuron import standin


@pytest.fixture
def optimum_neuron(monkeypatch):
    return standin.install(monkeypatch)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory, "llama")


@pytest.fixture
def model_config(tiny_model):
    from llmcore.models.config import ModelConfig

    return ModelConfig.from_path(tiny_model)


@pytest.fixture
def make_device(monkeypatch):
    """A NeuronDevice as the plugin hook creates it, for EngineConfig.extra settings."""
    monkeypatch.delenv("LLMCORE_NEURON_TARGET", raising=False)

    def make(**extra):
        from llmcore_neuron import plugin

        return plugin.llmcore_create_device(name="neuron", config=EngineConfig(device="neuron", extra=extra))

    return make
