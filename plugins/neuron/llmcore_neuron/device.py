"""The Neuron device: compile through optimum-neuron's export API, serve the compiled model.

Calls made (optimum-neuron 0.4.5, the NxD backend):

* compile: ``NeuronModelForCausalLM.get_neuron_config(model_dir, config=, instance_type=,
  batch_size=, sequence_length=, tensor_parallel_size=)``, then
  ``NeuronModelForCausalLM.export(model_dir, neuron_config=, config=, load_weights=False)``
  and ``model.save_pretrained(out_dir)`` (writes config.json, neuron_config.json, model.pt
  and the weights sharded per rank under checkpoint/).
* serve: ``NeuronModelForCausalLM.from_pretrained(artifact_dir)`` and its
  ``forward(input_ids, position_ids, seq_ids, sampling_params)``.

The tests in tests/neuron check these calls against a stand-in that records them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from llmcore.compiled.vendor import artifact_files, read_config_file
from llmcore.device import Device
from llmcore.errors import PluginError
from llmcore_neuron import __version__, planning, sdk
from llmcore_neuron.runner import NeuronStaticRunner

log = logging.getLogger("llmcore.neuron")

NEURON_CONFIG_FILE = "neuron_config.json"


def import_optimum_neuron():
    """optimum.neuron's causal-LM class, or a PluginError saying what to install."""
    try:  # optional dependency: the vendor SDK
        from optimum.neuron import NeuronModelForCausalLM
    except ImportError as exc:
        raise PluginError(
            f"neuron: optimum-neuron could not be imported ({type(exc).__name__}: {exc}). "
            f"{sdk.INSTALL_HINT}"
        ) from exc
    return NeuronModelForCausalLM


class NeuronDevice(Device):
    """Compiles with optimum-neuron and serves the compiled graphs with fixed slots."""

    artifact_config_file = NEURON_CONFIG_FILE

    @property
    def settings(self) -> dict[str, Any]:
        return dict(getattr(self.config, "extra", None) or {})

    @property
    def target(self) -> str:
        return sdk.resolve_target(self.settings.get("neuron_target"))

    @property
    def on_device_sampling(self) -> bool:
        """Sample on the NeuronCores (as optimum-neuron's own exports and hub cache do) instead of
        returning logits to the host; top-k/top-p/temperature only."""
        return bool(self.settings.get("neuron_on_device_sampling"))

    def plan(self, model_config, **settings):
        """The plan for ``settings`` (batch_size, max_seq_len, tensor_parallel, dtype, ...)."""
        settings.setdefault("num_cores", self.capabilities.device_count)
        return planning.plan_for(model_config, target=self.target, **settings)

    def describe_plan(self, plan, model_config=None) -> str:
        text = plan.describe() + (
            f"\nneuron target     {self.target} (optimum-neuron get_neuron_config: batch_size="
            f"{plan.batch_size}, sequence_length={plan.max_seq_len}, tensor_parallel_size="
            f"{plan.tensor_parallel}, dtype={plan.dtype}, continuous_batching="
            f"{plan.batch_size > 1}, on_device_sampling={self.on_device_sampling})"
        )
        if model_config is not None and model_config.num_heads % plan.tensor_parallel:
            text += (f"\nattention heads   {model_config.num_heads} padded to "
                     f"{planning.padded_heads(model_config.num_heads, plan.tensor_parallel)} for "
                     f"tensor parallel {plan.tensor_parallel}")
        return text

    def plan_from_artifact(self, artifact_dir, model_config):
        """(plan, device settings) of a directory saved by optimum-neuron's save_pretrained."""
        nc = read_neuron_config(Path(artifact_dir))
        plan = planning.plan_from_artifact(nc, model_config, self.target)
        settings = {"neuron_target": self.target}
        if nc.get("on_device_sampling"):
            settings["neuron_on_device_sampling"] = True
        return plan, settings

    def create_runner(self, model_config, folder, dtype, eos_token_ids, max_model_len):
        raise PluginError(
            "neuron serves compiled artifacts only: compile first with 'llmcore compile --device "
            "neuron --model MODEL --batch-size N --max-seq-len L', then serve with --compiled KEY"
        )

    # ------------------------------------------------------------- compile

    def compile_key_inputs(self, plan) -> dict[str, Any]:
        return {
            "compiler": "neuronx-cc",
            "compiler_version": sdk.installed_version("neuronx-cc") or "not installed",
            "compiler_flags": {
                "exporter": "optimum-neuron",
                "exporter_version": sdk.installed_version("optimum-neuron") or "not installed",
                # what neuronx-cc compiles for: inf2 and trn1 share NeuronCore-v2 code
                "target": sdk.COMPILE_TARGETS[self.target],
                "on_device_sampling": self.on_device_sampling,
                "plugin_version": __version__,
            },
        }

    def compile(self, model_path, model_config, plan, out_dir, progress=True) -> dict[str, Any]:
        planning.check_plan(plan)
        planning.check_model(model_config)
        neuron_cls = import_optimum_neuron()
        torch_dtype = getattr(torch, plan.dtype)
        hf_config = AutoConfig.from_pretrained(str(model_path)).get_text_config()
        # get_neuron_config takes the export dtype from the model config
        hf_config.dtype = torch_dtype
        neuron_config = neuron_cls.get_neuron_config(
            str(model_path), config=hf_config, instance_type=self.target,
            batch_size=plan.batch_size, sequence_length=plan.max_seq_len,
            tensor_parallel_size=plan.tensor_parallel,
        )
        # by default llmcore samples on the host (penalties, logprobs, seeds): the graphs return logits
        neuron_config.on_device_sampling = self.on_device_sampling
        _check_before_export(neuron_config, plan, self.on_device_sampling)
        log.info("neuron: exporting %s for %s (%s)", model_path, self.target, plan.to_dict())
        model = neuron_cls.export(str(model_path), neuron_config=neuron_config, config=hf_config,
                                  load_weights=False)
        out_dir = Path(out_dir)
        model.save_pretrained(str(out_dir))
        saved = read_neuron_config(out_dir)
        planning.reconcile_artifact(saved, plan, where=f"{out_dir.name}/{NEURON_CONFIG_FILE}",
                                    on_device_sampling=self.on_device_sampling)
        return {
            "neuron_config": saved,
            "target": self.target,
            "exporter": "optimum-neuron",
            "exporter_version": saved.get("optimum_neuron_version") or sdk.installed_version("optimum-neuron"),
            "files": artifact_files(out_dir),
        }

    # --------------------------------------------------------------- serve

    def create_static_runner(self, artifact_dir, plan, model_config, model_path, eos_token_ids):
        planning.check_plan(plan)
        artifact_dir = Path(artifact_dir)
        planning.reconcile_artifact(read_neuron_config(artifact_dir), plan,
                                    where=f"{artifact_dir}/{NEURON_CONFIG_FILE}",
                                    on_device_sampling=self.on_device_sampling)
        neuron_cls = import_optimum_neuron()
        model = neuron_cls.from_pretrained(str(artifact_dir))
        return NeuronStaticRunner(model, plan, model_config, eos_token_ids, seed=getattr(self.config, "seed", 0),
                                  on_device_sampling=self.on_device_sampling)


def read_neuron_config(artifact_dir: Path) -> dict[str, Any]:
    return read_config_file(artifact_dir, NEURON_CONFIG_FILE, "neuron")


def _check_before_export(neuron_config: Any, plan, on_device_sampling: bool) -> None:
    """Catch an SDK whose get_neuron_config no longer honours our settings, before a long compile."""
    have = {
        name: getattr(neuron_config, name, "<missing>")
        for name in planning.expected_neuron_config(plan, on_device_sampling)
    }
    dtype = have["torch_dtype"]
    have["torch_dtype"] = str(dtype).replace("torch.", "") if dtype != "<missing>" else dtype
    planning.reconcile_artifact(have, plan, where="optimum-neuron get_neuron_config()",
                                on_device_sampling=on_device_sampling)
