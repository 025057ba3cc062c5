"""The quantization registry: one matrix read by Engine, the CLI and `llmcore devices`."""

from __future__ import annotations

import importlib.util
import logging
import types

import pytest

from llmcore import hookimpl
from llmcore.errors import ConfigError
from llmcore.plugins import load_plugins
from llmcore.quantization import (
    QuantMethod, available_names, get, matrix, methods, methods_for_device,
)

BUILTIN = ["bnb-int8", "bnb-nf4", "awq", "eetq", "int4"]
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _plugin(*qmethods):
    mod = types.ModuleType("fake_quant_plugin")
    mod.LLMCORE_CONTRACT_VERSION = 1

    @hookimpl
    def llmcore_quantization_methods():
        return list(qmethods)

    mod.llmcore_quantization_methods = llmcore_quantization_methods
    return mod


@pytest.fixture
def no_plugins():
    return load_plugins(entry_points=[])


def test_builtin_methods_declare_devices_bits_and_checkpoint_needs(no_plugins):
    found = {m.name: m for m in methods(no_plugins)}
    assert list(found) == BUILTIN
    assert [(n, found[n].bits, found[n].prequantized) for n in BUILTIN] == [
        ("bnb-int8", 8, False), ("bnb-nf4", 4, False), ("awq", 4, True), ("eetq", 8, False), ("int4", 4, False),
    ]
    assert all(found[n].devices == ("cpu", "cuda") for n in BUILTIN)
    assert found["awq"].checkpoint_format == "awq"
    assert found["bnb-int8"].requires == ("bitsandbytes",)
    assert found["awq"].requires_on == {"cuda": ("triton",)}


def test_get_unknown_method_lists_the_known_ones(no_plugins):
    with pytest.raises(ConfigError) as err:
        get("gptq", no_plugins)
    assert "quantization='gptq': is not a known quantization method" in str(err.value)
    assert "bnb-int8, bnb-nf4, awq, eetq, int4" in str(err.value)


def test_methods_for_device(no_plugins):
    assert [m.name for m in methods_for_device("cpu", no_plugins)] == BUILTIN
    assert methods_for_device("neuron", no_plugins) == []


def test_a_plugin_contributes_a_method_through_the_hook(no_plugins, caplog):
    mine = QuantMethod("fp6-test", ("mydev",), ("float16",), False, 6, "test", loader="x:y")
    clash = QuantMethod("awq", ("mydev",), ("float16",), False, 4, "an impostor", loader="x:y")
    no_plugins.register(_plugin(mine, clash), "fakeq")
    with caplog.at_level(logging.ERROR, logger="llmcore.quantization"):
        names = [m.name for m in methods(no_plugins)]
    assert names == [*BUILTIN, "fp6-test"]
    assert get("awq", no_plugins).description != "an impostor"  # built-in kept
    assert "defined twice" in caplog.text
    assert [m.name for m in methods_for_device("mydev", no_plugins)] == ["fp6-test"]


def test_method_declarations_are_checked():
    with pytest.raises(ValueError, match="declares no devices"):
        QuantMethod("x", (), ("float16",), False, 4, "", loader="a:b")
    with pytest.raises(ValueError, match="must name its checkpoint_format"):
        QuantMethod("x", ("cpu",), ("float16",), True, 4, "", loader="a:b")
    with pytest.raises(ValueError, match="lower case"):
        QuantMethod("AWQ", ("cpu",), ("float16",), False, 4, "", loader="a:b")


def test_requirements_decide_availability():
    m = QuantMethod("needs-x", ("cpu", "cuda"), ("float32",), False, 8, "", loader="a:b",
                    requires_on={"cuda": ("surely_not_a_module_xyz",)})
    assert m.available_on("cpu") and m.missing("cpu") == []
    assert not m.available_on("cuda") and m.missing("cuda") == ["surely_not_a_module_xyz"]
    assert not m.available_on("neuron")


def test_cpu_capabilities_come_from_the_registry():
    from llmcore_cpu.plugin import capabilities

    offered = capabilities().quantization
    assert offered == available_names("cpu")
    assert {"awq", "eetq", "int4"} <= set(offered)
    assert ("bnb-int8" in offered) == HAVE_BNB and ("bnb-nf4" in offered) == HAVE_BNB


def test_cpu_probe_without_bitsandbytes_drops_bnb(monkeypatch):
    from llmcore_cpu.plugin import capabilities

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert capabilities().quantization == ("awq", "eetq", "int4")


def test_matrix_cells(no_plugins):
    cells = matrix(no_plugins)
    assert cells["eetq"] == {"cpu": "yes", "cuda": "yes (needs triton)"}
    assert cells["bnb-nf4"] == {"cpu": "yes (needs bitsandbytes)", "cuda": "yes (needs bitsandbytes)"}
    assert matrix(no_plugins, devices=("neuron",))["awq"] == {"neuron": "-"}


def test_devices_command_shows_the_cpu_methods():
    from llmcore.cli.devices import collect

    cpu = next(d for d in collect()["devices"] if d["name"] == "cpu")
    assert tuple(cpu["capabilities"]["quantization"]) == available_names("cpu")
