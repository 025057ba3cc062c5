"""The device conformance suite: one pytest class every device plugin runs against itself.

(One file over 450 lines on purpose: a plugin author reads the whole contract in one place.)

Subclass :class:`DeviceConformance` in your plugin's tests and name the device
and the plugin module; pytest collects every check below::

    from llmcore.testing.conformance import DeviceConformance

    class TestMyDeviceConformance(DeviceConformance):
        device_name = "mydev"
        plugin_module = "llmcore_mydev.plugin"

What it checks, with no hardware-specific knowledge:

* the plugin declares a supported contract version and registers cleanly;
* the probe answers for the device, explains a score of 0 (reason and hint),
  and has no side effects: run in a fresh process, it imports no heavy module
  (torch, transformers, vendor SDKs, unless listed in ``probe_may_import``),
  starts no thread and writes no file;
* the capabilities are consistent (default dtype offered, fixed slots and
  compile imply static shapes, ...) and serialise to JSON;
* the device is created for its own name only, sizes and allocates a KV cache;
* one prefill and the decode steps after it, for two sequences batched
  together, pick the same greedy tokens as Hugging Face transformers with
  log-probabilities within tolerance; so do a chunked prompt, a one-token
  prompt and a sequence recomputed after preemption;
* static devices (``needs_compile`` or fixed slots) compile a plan for a tiny
  model, refuse requests beyond their slots or sequence length with a
  RequestError that names the limit, reuse a slot after its sequence finishes,
  refuse an artifact served under a different plan with an error naming both
  values, and refuse eager serving with an error that says to compile.

Override a fixture (``engine_config``, ``tiny_model``, ``plan``, ...), a class
attribute or :meth:`DeviceConformance.create_runner` to adapt it; set
``requires_device = True`` for real hardware, so the runner checks skip with
the probe's reason where the device is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from llmcore.capabilities import KV_FIXED_SLOTS, KV_PAGED, Capabilities, DeviceProbe
from llmcore.compiled.plan import DTYPE_BYTES, StaticPlan, plan_static
from llmcore.config import EngineConfig
from llmcore.contract import ScheduledBatch, ScheduledSeq
from llmcore.device import Device
from llmcore.errors import ConfigError, LlmcoreError, RequestError
from llmcore.hookspecs import SUPPORTED_CONTRACT_VERSIONS
from llmcore.models.config import ModelConfig
from llmcore.plugins import load_plugins
from llmcore.sampling_params import SamplingParams
from llmcore.testing.models import make_random_model
from llmcore.testing.reference import HFReference

#: Modules a probe must not import: each costs seconds or touches the device.
HEAVY_MODULES = ("torch", "transformers", "accelerate", "safetensors", "numpy", "triton", "optimum",
                 "torch_neuronx", "neuronxcc", "neuronx_distributed", "rebel", "vllm")

_MODELS: dict[str, Path] = {}


def shared_tiny_model(tmp_path_factory, arch: str = "llama", **overrides: Any) -> Path:
    """A small random Hugging Face model, built once per session for each (arch, overrides)."""

    key = json.dumps([arch, overrides], sort_keys=True)
    if key not in _MODELS or not _MODELS[key].is_dir():
        path = tmp_path_factory.mktemp("conformance-model") / "model"
        # a generated tokenizer: the checks feed token ids, and a device's image need not ship SmolLM2's
        _MODELS[key] = make_random_model(path, arch=arch, seed=7, tokenizer="words", **overrides)
    return _MODELS[key]


PROMPT_A = [1, 4093, 532, 9043, 310, 28, 1711]
PROMPT_B = [1, 742, 18, 30210, 995]


def _entry(key: str, history: list[int], start: int, end: int, table: list[int], num_prompt: int,
           logprobs: int | None = 0):
    return ScheduledSeq(
        seq_id=abs(hash(key)) % 100_000, key=key, token_ids=list(history[start:end]), start_pos=start,
        block_table=table, params=SamplingParams(temperature=0.0, logprobs=logprobs, max_tokens=64),
        history=history, num_prompt_tokens=num_prompt, sample=end == len(history),
        seeds=[None], rng_keys=[key],
    )


class DeviceConformance:
    #: the name the probe answers with and ``--device`` selects
    device_name: str = ""
    #: importable module holding the plugin's hooks (what the entry point names)
    plugin_module: str = ""
    #: check that an ``llmcore.plugins`` entry point names ``plugin_module``
    check_entry_point: bool = True
    #: heavy modules this probe may import anyway (e.g. cuda's probe imports torch on a GPU host)
    probe_may_import: tuple[str, ...] = ()
    #: skip the runner checks with the probe's reason when the device is not usable here
    requires_device: bool = False
    #: extra EngineConfig settings (``EngineConfig.extra``) for the device
    engine_extra: dict[str, Any] = {}
    model_arch: str = "llama"
    model_overrides: dict[str, Any] = {}
    #: None: float32 where offered (exact comparison), else the device's default
    dtype: str | None = None
    #: slots and length compiled for static devices, and the runner's max length otherwise
    batch_size: int = 2
    max_seq_len: int = 64
    #: log-probability tolerance; None: 2e-3 in float32, 0.1 in 16-bit dtypes
    logprob_atol: float | None = None

    # ------------------------------------------------------------ fixtures

    @pytest.fixture
    def plugin(self):
        assert self.plugin_module, "set plugin_module, e.g. 'llmcore_mydev.plugin'"
        return importlib.import_module(self.plugin_module)

    @pytest.fixture
    def registry(self, plugin):
        return load_plugins(entry_points=[], extra=[(self.device_name, plugin)])

    @pytest.fixture
    def probe(self, registry) -> DeviceProbe:
        answers = []
        for a in registry.hook.llmcore_probe(config=dict(self.engine_extra)):
            answers += a if isinstance(a, list) else [a]
        mine = [a for a in answers if isinstance(a, DeviceProbe) and a.name == self.device_name]
        assert mine, f"no probe answered for {self.device_name!r}; got {answers!r}"
        return mine[0]

    @pytest.fixture
    def engine_config(self) -> EngineConfig:
        return EngineConfig(device=self.device_name, seed=0, extra=dict(self.engine_extra))

    @pytest.fixture
    def device(self, registry, engine_config) -> Device:
        dev = registry.hook.llmcore_create_device(name=self.device_name, config=engine_config)
        assert isinstance(dev, Device), f"llmcore_create_device({self.device_name!r}) returned {dev!r}"
        return dev

    @pytest.fixture
    def run_dtype(self, probe) -> str:
        caps = probe.capabilities
        if self.dtype:
            return self.dtype
        return "float32" if "float32" in caps.dtypes else caps.default_dtype

    @pytest.fixture(scope="class")
    def tiny_model(self, tmp_path_factory) -> Path:
        return shared_tiny_model(tmp_path_factory, self.model_arch, **self.model_overrides)

    @pytest.fixture(scope="class")
    def reference(self, tiny_model):
        return HFReference.from_pretrained(tiny_model)

    @pytest.fixture
    def model_config(self, tiny_model):
        return ModelConfig.from_path(tiny_model)

    @pytest.fixture
    def static(self, probe) -> bool:
        caps = probe.capabilities
        return caps.needs_compile or caps.kv_layout == KV_FIXED_SLOTS

    @pytest.fixture
    def plan(self, static, device, model_config, run_dtype) -> StaticPlan | None:
        if not static:
            return None
        settings = dict(batch_size=self.batch_size, max_seq_len=self.max_seq_len, dtype=run_dtype)
        if hasattr(device, "plan"):
            return device.plan(model_config, **settings)
        return plan_static(model_config, device.capabilities, device.name, **settings)

    @pytest.fixture
    def artifact(self, plan, device, tiny_model, model_config, tmp_path) -> Path | None:
        if plan is None:
            return None
        out = tmp_path / "artifact"
        out.mkdir()
        meta = device.compile(tiny_model, model_config, plan, out, progress=False)
        json.dumps(meta)  # stored in the cache manifest: must be JSON
        return out

    @pytest.fixture
    def usable(self, probe) -> None:
        if self.requires_device and not probe.usable:
            pytest.skip(f"{self.device_name} cannot run here: {probe.reason}")

    @pytest.fixture
    def make_runner(self, usable, device, model_config, tiny_model, run_dtype, plan, artifact):
        def make(plan_override: StaticPlan | None = None):
            if plan is not None:
                runner = device.create_static_runner(artifact, plan_override or plan, model_config,
                                                     tiny_model, model_config.eos_token_ids)
            else:
                runner = self.create_runner(device, model_config, tiny_model, run_dtype)
            runner.allocate_kv_cache(self.blocks_per_seq(runner) * (self.batch_size + 2))
            return runner

        return make

    @pytest.fixture
    def runner(self, make_runner):
        return make_runner()

    def create_runner(self, device, model_config, tiny_model, run_dtype):
        """The runner the checks drive (eager devices): ``device.create_runner``; override to
        build it another way (the cuda plugin's tests build it on the CPU under Triton's interpreter)."""
        return device.create_runner(model_config, tiny_model, run_dtype, model_config.eos_token_ids,
                                    self.max_seq_len)

    def blocks_per_seq(self, runner) -> int:
        return math.ceil(self.max_seq_len / runner.block_size)

    def table(self, runner, index: int) -> list[int]:
        """A block table of its own for the ``index``-th sequence of a test."""
        k = self.blocks_per_seq(runner)
        return list(range(index * k, index * k + k))

    def atol(self, dtype: str) -> float:
        if self.logprob_atol is not None:
            return self.logprob_atol
        return 2e-3 if dtype == "float32" else 0.1

    def check_against(self, reference, history, result, dtype: str) -> int:
        """Assert ``result`` is the greedy continuation of ``history``; return its token."""
        import torch

        assert result is not None and len(result.token_ids) == 1, f"expected one sampled token, got {result!r}"
        logprobs = torch.log_softmax(reference.next_logits(history), dim=-1)
        top2 = torch.topk(logprobs, 2)
        token = result.token_ids[0]
        tol = self.atol(dtype)
        near_tie = float(top2.values[0] - top2.values[1]) < 2 * tol
        allowed = top2.indices.tolist() if near_tie else [int(top2.indices[0])]
        assert token in allowed, (
            f"after {len(history)} tokens the device picked {token}, transformers picks {allowed[0]} "
            f"(logprobs {float(logprobs[token]):.4f} vs {float(top2.values[0]):.4f})"
        )
        assert result.chosen_logprobs is not None, "a greedy request with logprobs=0 must report its logprob"
        assert abs(result.chosen_logprobs[0] - float(logprobs[token])) <= tol, (
            f"logprob of token {token}: device {result.chosen_logprobs[0]:.5f}, "
            f"transformers {float(logprobs[token]):.5f} (tolerance {tol})"
        )
        return token

    def step(self, runner, entries, finished=()):
        return runner.execute(ScheduledBatch(seqs=list(entries), finished_keys=list(finished)))

    # -------------------------------------------------- plugin and contract

    def test_declares_a_supported_contract_version(self, plugin):
        version = getattr(plugin, "LLMCORE_CONTRACT_VERSION", None)
        assert version in SUPPORTED_CONTRACT_VERSIONS, (
            f"{self.plugin_module}.LLMCORE_CONTRACT_VERSION = {version!r}; supported: {SUPPORTED_CONTRACT_VERSIONS}"
        )

    def test_registers_without_refusal(self, registry):
        assert not registry.refused, [r.reason for r in registry.refused]
        assert self.device_name in registry.names()

    def test_entry_point_names_the_plugin(self):
        if not self.check_entry_point:
            pytest.skip("check_entry_point = False")
        from importlib.metadata import entry_points

        values = {ep.value for ep in entry_points(group="llmcore.plugins")}
        assert self.plugin_module in values, (
            f"no 'llmcore.plugins' entry point names {self.plugin_module}; installed: {sorted(values)}"
        )

    # ---------------------------------------------------------------- probe

    def test_probe_is_well_formed(self, probe, plugin):
        assert isinstance(probe.capabilities, Capabilities)
        assert isinstance(probe.score, int) and probe.score >= 0
        if probe.score == 0:
            assert probe.reason, "a probe with score 0 must say why (reason)"
            assert probe.hint, "a probe with score 0 must say what would fix it (hint)"
        assert probe.plugin_version, "DeviceProbe.plugin_version is empty"

    def test_probe_has_no_side_effects(self, tmp_path):
        """In a fresh process: no heavy import, no new thread, no file written (cwd and HOME)."""
        home, cwd = tmp_path / "home", tmp_path / "cwd"
        home.mkdir()
        cwd.mkdir()
        code = textwrap.dedent(f"""
            import importlib, json, sys, threading
            plugin = importlib.import_module({self.plugin_module!r})
            before, threads = set(sys.modules), threading.active_count()
            answer = plugin.llmcore_probe(config={dict(self.engine_extra)!r})
            answers = answer if isinstance(answer, list) else [answer]
            print(json.dumps({{
                "new_modules": sorted(set(sys.modules) - before),
                "new_threads": threading.active_count() - threads,
                "names": [a.name for a in answers if a is not None],
            }}))
        """)
        env = dict(os.environ, HOME=str(home), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert self.device_name in out["names"]
        heavy = sorted({m.split(".")[0] for m in out["new_modules"]} & set(HEAVY_MODULES)
                       - set(self.probe_may_import))
        assert not heavy, f"the probe imported {heavy}; import them lazily, when a model loads"
        assert out["new_threads"] <= 0, f"the probe left {out['new_threads']} thread(s) running"
        written = [str(p) for d in (home, cwd) for p in d.rglob("*")]
        assert not written, f"the probe wrote files: {written}"

    # --------------------------------------------------------- capabilities

    def test_capabilities_are_consistent(self, probe):
        c = probe.capabilities
        assert c.dtypes and c.default_dtype in c.dtypes
        unknown = [d for d in c.dtypes if d not in DTYPE_BYTES]
        assert not unknown, f"dtypes {unknown} are not llmcore dtype names ({', '.join(DTYPE_BYTES)})"
        assert len(set(c.quantization)) == len(c.quantization), f"duplicate quantization names {c.quantization}"
        assert c.kv_layout in (KV_PAGED, KV_FIXED_SLOTS)
        if c.kv_layout == KV_FIXED_SLOTS:
            assert c.static_shapes, "fixed KV slots imply static shapes"
        if c.needs_compile:
            assert c.static_shapes, "an ahead-of-time compiled device has static shapes"
        assert isinstance(c.device_count, int) and c.device_count >= 1
        assert c.memory_bytes is None or c.memory_bytes > 0
        assert c.max_batch_size is None or c.max_batch_size > 0
        assert c.max_seq_len is None or c.max_seq_len > 1
        if not c.tensor_parallel:
            assert c.device_count >= 1
        json.dumps(probe.to_dict())

    # --------------------------------------------------------------- device

    def test_creates_its_device_and_no_other(self, registry, engine_config, device, probe):
        assert device.name == self.device_name
        # free memory may change between two probes; everything else must not
        same = [dataclasses.replace(c, memory_bytes=None) for c in (device.capabilities, probe.capabilities)]
        assert same[0] == same[1], f"the device's capabilities differ from its probe's: {same}"
        other = registry.hook.llmcore_create_device(name=f"not-{self.device_name}", config=engine_config)
        assert other is None, "llmcore_create_device must return None for another device's name"

    def test_kv_cache_is_sized_and_allocated(self, runner):
        per_block = runner.kv_bytes_per_block()
        assert isinstance(per_block, int) and per_block > 0
        assert runner.block_size > 0
        assert runner.num_kv_blocks == self.blocks_per_seq(runner) * (self.batch_size + 2)

    # ---------------------------------------------------------------- runner

    def test_prefill_then_decode_matches_reference(self, runner, reference, run_dtype):
        a, b = list(PROMPT_A), list(PROMPT_B)
        ta, tb = self.table(runner, 0), self.table(runner, 1)
        ra, rb = self.step(runner, [_entry("a:0", a, 0, len(a), ta, len(PROMPT_A)),
                                    _entry("b:0", b, 0, len(b), tb, len(PROMPT_B))])
        a.append(self.check_against(reference, a, ra, run_dtype))
        b.append(self.check_against(reference, b, rb, run_dtype))
        for _ in range(2):  # both decode together
            ra, rb = self.step(runner, [_entry("a:0", a, len(a) - 1, len(a), ta, len(PROMPT_A)),
                                        _entry("b:0", b, len(b) - 1, len(b), tb, len(PROMPT_B))])
            a.append(self.check_against(reference, a, ra, run_dtype))
            b.append(self.check_against(reference, b, rb, run_dtype))
        # one sequence decodes while the other waits, then the other way round: the waiting
        # one's KV must be intact (a static runner must not pad a short batch into live slots)
        (ra,) = self.step(runner, [_entry("a:0", a, len(a) - 1, len(a), ta, len(PROMPT_A))])
        a.append(self.check_against(reference, a, ra, run_dtype))
        (rb,) = self.step(runner, [_entry("b:0", b, len(b) - 1, len(b), tb, len(PROMPT_B))])
        b.append(self.check_against(reference, b, rb, run_dtype))
        (ra,) = self.step(runner, [_entry("a:0", a, len(a) - 1, len(a), ta, len(PROMPT_A))])
        self.check_against(reference, a, ra, run_dtype)

    def test_chunked_prompt(self, runner, reference, run_dtype):
        a, t = list(PROMPT_A), self.table(runner, 0)
        (first,) = self.step(runner, [_entry("c:0", a, 0, 4, t, len(a))])
        assert first is None, "a prompt chunk that does not end the prompt samples nothing"
        (last,) = self.step(runner, [_entry("c:0", a, 4, len(a), t, len(a))])
        a.append(self.check_against(reference, a, last, run_dtype))
        (nxt,) = self.step(runner, [_entry("c:0", a, len(a) - 1, len(a), t, len(PROMPT_A))])
        self.check_against(reference, a, nxt, run_dtype)

    def test_single_token_prompt(self, runner, reference, run_dtype):
        a, t = [1], self.table(runner, 0)
        (r,) = self.step(runner, [_entry("s:0", a, 0, 1, t, 1)])
        a.append(self.check_against(reference, a, r, run_dtype))
        (r,) = self.step(runner, [_entry("s:0", a, 1, 2, t, 1)])
        self.check_against(reference, a, r, run_dtype)

    def test_recompute_after_preemption(self, runner, reference, run_dtype):
        a, t = list(PROMPT_A), self.table(runner, 0)
        (r,) = self.step(runner, [_entry("p:0", a, 0, len(a), t, len(PROMPT_A))])
        a.append(self.check_against(reference, a, r, run_dtype))
        (r,) = self.step(runner, [_entry("p:0", a, len(a) - 1, len(a), t, len(PROMPT_A))])
        a.append(self.check_against(reference, a, r, run_dtype))
        # preempted: the same key comes back with prompt + outputs computed from position 0
        (r,) = self.step(runner, [_entry("p:0", a, 0, len(a), t, len(PROMPT_A))])
        a.append(self.check_against(reference, a, r, run_dtype))
        (r,) = self.step(runner, [_entry("p:0", a, len(a) - 1, len(a), t, len(PROMPT_A))])
        self.check_against(reference, a, r, run_dtype)

    # ------------------------------------------------------- static devices

    @pytest.fixture
    def static_only(self, static):
        if not static:
            pytest.skip(f"{self.device_name} is not a static-shape device")

    def test_static_refuses_more_sequences_than_slots(self, static_only, runner, plan):
        entries = [_entry(f"r{i}:0", list(PROMPT_B), 0, len(PROMPT_B), self.table(runner, i), len(PROMPT_B))
                   for i in range(plan.batch_size)]
        self.step(runner, entries)
        extra = _entry("late:0", list(PROMPT_B), 0, len(PROMPT_B), self.table(runner, plan.batch_size),
                       len(PROMPT_B))
        with pytest.raises(RequestError) as err:
            self.step(runner, [extra])
        assert str(plan.batch_size) in str(err.value) and "batch" in str(err.value)

    def test_static_refuses_sequences_beyond_max_seq_len(self, static_only, runner, plan):
        history = [1] * (plan.max_seq_len + 1)
        with pytest.raises(RequestError) as err:
            self.step(runner, [_entry("long:0", history, 0, len(history), self.table(runner, 0), len(history))])
        assert str(plan.max_seq_len) in str(err.value)

    def test_static_slot_is_reused_after_finish(self, static_only, runner, plan, reference, run_dtype):
        live = {f"u{i}:0": list(PROMPT_B[: 3 + i]) for i in range(plan.batch_size)}
        results = self.step(runner, [_entry(k, h, 0, len(h), self.table(runner, i), len(h))
                                     for i, (k, h) in enumerate(live.items())])
        for (k, h), r in zip(live.items(), results):
            h.append(self.check_against(reference, h, r, run_dtype))
        gone = next(iter(live))
        del live[gone]
        fresh = list(PROMPT_A)
        (r,) = self.step(runner, [_entry("new:0", fresh, 0, len(fresh), self.table(runner, 0), len(fresh))],
                         finished=[gone])
        self.check_against(reference, fresh, r, run_dtype)
        for i, (k, h) in enumerate(live.items(), start=1):  # the others' KV is untouched
            (r,) = self.step(runner, [_entry(k, h, len(h) - 1, len(h), self.table(runner, i), len(h) - 1)])
            self.check_against(reference, h, r, run_dtype)

    def test_static_refuses_an_artifact_compiled_for_another_plan(self, static_only, make_runner, plan):
        other = dataclasses.replace(plan, batch_size=plan.batch_size + 1, batch_buckets=(plan.batch_size + 1,))
        with pytest.raises(ConfigError) as err:
            make_runner(other)
        msg = str(err.value)
        assert "batch_size" in msg and str(plan.batch_size) in msg and str(plan.batch_size + 1) in msg, msg

    def test_static_device_says_to_compile_first(self, static_only, probe, device, model_config, tiny_model,
                                                 run_dtype):
        if not probe.capabilities.needs_compile:
            pytest.skip("the device also serves without an ahead-of-time compile")
        with pytest.raises(LlmcoreError) as err:
            device.create_runner(model_config, tiny_model, run_dtype, model_config.eos_token_ids, self.max_seq_len)
        assert "compile" in str(err.value)
