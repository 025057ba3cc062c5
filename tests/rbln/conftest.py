"""Fixtures for the rbln plugin's tests: the optimum-rbln stand-in, a tiny model, a device."""

from __future__ import annotations

import pytest

from llmcore.config import EngineConfig
from llmcore.testing.conformance import shared_tiny_model
from tests.rbln import standin


@pytest.fixture
def optimum_rbln(monkeypatch):
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
    """An RblnDevice as the plugin hook creates it, for EngineConfig.extra settings (no card here)."""
    monkeypatch.delenv("LLMCORE_RBLN_NPU", raising=False)
    from llmcore_rbln import sdk

    monkeypatch.setattr(sdk, "rbln_devices", lambda dev="/dev": [])

    def make(**extra):
        from llmcore_rbln import plugin

        return plugin.llmcore_create_device(name="rbln", config=EngineConfig(device="rbln", extra=extra))

    return make
