"""The plugin contract driven through real entry points (throwaway distributions on sys.path)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from llmcore.errors import ConfigError, DeviceUnavailableError, PluginError
from llmcore.plugins import load_plugins
from llmcore.selection import probe_all, select_device

GOOD = '''
from llmcore import hookimpl
from llmcore.capabilities import Capabilities, DeviceProbe
LLMCORE_CONTRACT_VERSION = {version}

@hookimpl
def {hook}(config):
    return DeviceProbe(name="{name}", score={score}, capabilities=Capabilities(), reason="{reason}")
'''


@pytest.fixture
def dist_dir(tmp_path, monkeypatch):
    """Make distributions importable with real entry-point metadata, for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def make(name: str, score: int = 50, version: int = 1, hook: str = "llmcore_probe",
             reason: str = "", body: str | None = None):
        pkg = f"toy_{name}"
        src = body if body is not None else GOOD.format(version=version, hook=hook, name=name,
                                                         score=score, reason=reason)
        (tmp_path / f"{pkg}.py").write_text(textwrap.dedent(src))
        info = tmp_path / f"{pkg}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[llmcore.plugins]\n{name} = {pkg}\n")
        created.append(pkg)
        return pkg

    yield make
    for pkg in created:
        sys.modules.pop(pkg, None)


def test_out_of_tree_plugin_is_found_through_its_entry_point(dist_dir):
    dist_dir("toyaccel", score=50)
    reg = load_plugins()
    assert "toyaccel" in reg.names()
    assert "toy_toyaccel" in reg.sources["toyaccel"]
    reports = probe_all(reg)
    assert select_device(reg, reports, None).probe.name == "toyaccel"  # 50 beats cpu's 10
    assert select_device(reg, reports, "cpu").probe.name == "cpu"  # --device wins


def test_misspelled_hook_is_refused_and_named(dist_dir):
    dist_dir("typo", hook="llmcore_prob")
    reg = load_plugins()
    assert "typo" not in reg.names()
    [refused] = [r for r in reg.refused if r.name == "typo"]
    assert "llmcore_prob" in refused.reason
    assert "llmcore_probe" in refused.reason  # says what the valid names are
    assert "cpu" in reg.names()  # the rest still load


def test_wrong_contract_version_names_both_versions(dist_dir):
    dist_dir("future", version=7)
    reg = load_plugins()
    [refused] = [r for r in reg.refused if r.name == "future"]
    assert "contract version 7" in refused.reason and "supports contract version 1" in refused.reason
    with pytest.raises(PluginError, match="contract version 7"):
        select_device(reg, probe_all(reg), "future")


def test_missing_contract_version_is_refused(dist_dir):
    dist_dir("bare", body="from llmcore import hookimpl\n")
    reg = load_plugins()
    [refused] = [r for r in reg.refused if r.name == "bare"]
    assert "LLMCORE_CONTRACT_VERSION" in refused.reason


def test_two_usable_plugins_never_crash_and_ties_break_by_name(dist_dir):
    dist_dir("zeta", score=70)
    dist_dir("alpha", score=70)
    reg = load_plugins()
    reports = probe_all(reg)
    assert {"zeta", "alpha", "cpu"} <= {r.probe.name for r in reports}
    assert select_device(reg, reports, None).probe.name == "alpha"


def test_import_error_and_raising_probe_are_reported_not_fatal(dist_dir):
    dist_dir("broken", body="import does_not_exist_anywhere\n")
    dist_dir("raiser", body=(
        "from llmcore import hookimpl\nLLMCORE_CONTRACT_VERSION = 1\n"
        "@hookimpl\ndef llmcore_probe(config):\n    raise RuntimeError('driver exploded')\n"
    ))
    reg = load_plugins()
    assert any(r.name == "broken" and "does_not_exist_anywhere" in r.reason for r in reg.refused)
    reports = probe_all(reg)
    [raiser] = [r.probe for r in reports if r.plugin == "raiser"]
    assert raiser.score == 0 and "driver exploded" in raiser.reason
    assert select_device(reg, reports, None).probe.name == "cpu"


def test_disable_plugins_by_env(monkeypatch):
    monkeypatch.setenv("LLMCORE_DISABLE_PLUGINS", "rbln, neuron")
    reg = load_plugins()
    assert "rbln" not in reg.names() and "neuron" not in reg.names()
    with pytest.raises(PluginError, match="disabled"):
        select_device(reg, probe_all(reg), "rbln")


def test_builtin_plugins_report_honest_reasons_here():
    reg = load_plugins()
    assert {"cpu", "cuda", "neuron", "rbln"} <= set(reg.names())
    probes = {r.probe.name: r.probe for r in probe_all(reg)}
    assert probes["cpu"].usable
    for name in ("neuron", "rbln"):
        assert probes[name].score == 0 and probes[name].reason and probes[name].hint


def test_unknown_device_lists_known_ones():
    reg = load_plugins()
    with pytest.raises(ConfigError) as exc:
        select_device(reg, probe_all(reg), "tpu")
    msg = str(exc.value)
    assert "device='tpu'" in msg and "cpu" in msg and "neuron" in msg


def test_unusable_device_says_why_and_how_to_fix():
    reg = load_plugins()
    with pytest.raises(DeviceUnavailableError) as exc:
        select_device(reg, probe_all(reg), "neuron")
    assert "/dev/neuron" in str(exc.value) and "llmcore[neuron]" in str(exc.value)


def test_plugin_imports_need_no_vendor_sdk():
    import importlib

    for mod in ("llmcore_cpu.plugin", "llmcore_cuda.plugin", "llmcore_neuron.plugin", "llmcore_rbln.plugin"):
        importlib.import_module(mod)
    assert "optimum" not in sys.modules and "torch_neuronx" not in sys.modules
