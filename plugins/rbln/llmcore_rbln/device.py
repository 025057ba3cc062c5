"""The RBLN device: compile through optimum-rbln, serve the compiled decoder with fixed slots.

Calls made (optimum-rbln 0.12.0):

* compile: ``RBLN<Arch>.from_pretrained(model_dir, export=True, dtype=, rbln_batch_size=,
  rbln_max_seq_len=, rbln_num_devices=, rbln_attn_impl=, rbln_kvcache_block_size=,
  rbln_kvcache_partition_len=, rbln_kvcache_num_blocks=, rbln_decoder_batch_sizes=,
  rbln_create_runtimes=False[, rbln_npu=][, rbln_prefill_chunk_size=][, rbln_quantization=])``
  then ``model.save_pretrained(out_dir)`` (writes prefill.rbln, decoder_batch_<n>.rbln,
  rbln_config.json, config.json).
* serve: ``RBLN<Arch>.from_pretrained(artifact_dir, export=False)``, then its runtimes
  ``model.prefill_decoder(input_ids=, cache_position=, block_tables=)`` and
  ``model.decoders[n](input_ids=, cache_position=, block_tables=)``, the same entry points
  vllm-rbln drives.

The tests in tests/rbln check these calls against a stand-in that records them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llmcore.compiled.vendor import artifact_files, read_config_file
from llmcore.device import Device
from llmcore.errors import PluginError
from llmcore_rbln import __version__, planning, sdk
from llmcore_rbln import quantization as quant
from llmcore_rbln.runner import RblnStaticRunner

log = logging.getLogger("llmcore.rbln")

RBLN_CONFIG_FILE = "rbln_config.json"


def import_model_class(architecture: str):
    """``optimum.rbln.RBLN<architecture>``, or a PluginError saying what to install."""
    try:  # optional dependency: the vendor SDK
        import optimum.rbln as rbln
    except ImportError as exc:
        raise PluginError(
            f"rbln: optimum-rbln could not be imported ({type(exc).__name__}: {exc}). {sdk.INSTALL_HINT}"
        ) from exc
    cls = getattr(rbln, f"RBLN{architecture}", None)
    if cls is None:
        raise PluginError(f"rbln: optimum-rbln {getattr(rbln, '__version__', '?')} has no RBLN{architecture}")
    return cls


class RblnDevice(Device):
    """Compiles with optimum-rbln and serves the compiled prefill/decode graphs with fixed slots."""

    artifact_config_file = RBLN_CONFIG_FILE

    @property
    def settings(self) -> dict[str, Any]:
        return dict(getattr(self.config, "extra", None) or {})

    @property
    def npu(self) -> tuple[str, bool]:
        """(target NPU, whether to pass it to the compiler: configured, or no card to ask)."""
        npu, given = sdk.resolve_npu(self.settings.get("rbln_npu"))
        return npu, given or not sdk.rbln_devices()

    def plan(self, model_config, **settings):
        """The plan for ``settings`` (batch_size, max_seq_len, tensor_parallel, block_size, ...)."""
        settings.setdefault("num_devices", self.capabilities.device_count)
        settings.setdefault("prefill_chunk_size", self.settings.get("rbln_prefill_chunk_size"))
        return planning.plan_for(model_config, npu=self.npu[0], **settings)

    def describe_plan(self, plan, model_config=None) -> str:
        npu, _ = self.npu
        kw = planning.sdk_kwargs(plan, npu, True, self.settings.get("rbln_prefill_chunk_size"))
        return plan.describe() + "\nrbln settings     " + ", ".join(f"{k}={v!r}" for k, v in kw.items())

    def plan_from_artifact(self, artifact_dir, model_config):
        """(plan, device settings) of a directory saved by optimum-rbln's save_pretrained."""
        cfg = read_rbln_config(Path(artifact_dir))
        plan = planning.plan_from_artifact(cfg, model_config, self.settings.get("rbln_npu"))
        _, npu = planning.saved_devices(cfg)
        settings = {"rbln_npu": npu or self.npu[0]}
        if cfg.get("prefill_chunk_size") not in (None, sdk.family(settings["rbln_npu"]).default_prefill_chunk):
            settings["rbln_prefill_chunk_size"] = cfg["prefill_chunk_size"]
        return plan, settings

    def create_runner(self, model_config, folder, dtype, eos_token_ids, max_model_len):
        raise PluginError(
            "rbln serves compiled artifacts only: compile first with 'llmcore compile --device rbln "
            "--model MODEL --batch-size N --max-seq-len L', then serve with --compiled KEY"
        )

    # ------------------------------------------------------------- compile

    def compile_key_inputs(self, plan) -> dict[str, Any]:
        npu, _ = self.npu
        return {
            "compiler": "rebel-compiler",
            "compiler_version": sdk.installed_version("rebel-compiler") or "not installed",
            "compiler_flags": {
                "exporter": "optimum-rbln",
                "exporter_version": sdk.installed_version("optimum-rbln") or "not installed",
                "npu": npu,
                "prefill_chunk_size": self.settings.get("rbln_prefill_chunk_size"),
                "plugin_version": __version__,
            },
        }

    def compile(self, model_path, model_config, plan, out_dir, progress=True) -> dict[str, Any]:
        npu, pass_npu = self.npu
        planning.check_plan(plan, npu)
        planning.check_model(model_config)
        chunk = self.settings.get("rbln_prefill_chunk_size")
        planning.check_prefill_chunk(chunk)
        if plan.quantization is not None:
            quant.check_prequantized(Path(model_path), plan.quantization)
        cls = import_model_class(model_config.architecture)
        kwargs = planning.sdk_kwargs(plan, npu, pass_npu, chunk)
        if plan.quantization is None:
            # quantized checkpoints keep the dtype of their weights and scales
            kwargs["dtype"] = getattr(torch, plan.dtype)
        log.info("rbln: compiling %s with %s", model_path, kwargs)
        model = cls.from_pretrained(str(model_path), export=True, **kwargs)
        out_dir = Path(out_dir)
        model.save_pretrained(str(out_dir))
        saved = read_rbln_config(out_dir)
        planning.reconcile_artifact(saved, plan, npu, where=f"{out_dir.name}/{RBLN_CONFIG_FILE}")
        return {
            "rbln_config": saved,
            "npu": npu,
            "exporter": "optimum-rbln",
            "exporter_version": saved.get("optimum_rbln_version") or sdk.installed_version("optimum-rbln"),
            "files": artifact_files(out_dir),
        }

    # --------------------------------------------------------------- serve

    def create_static_runner(self, artifact_dir, plan, model_config, model_path, eos_token_ids):
        npu, _ = self.npu
        planning.check_plan(plan, npu)
        artifact_dir = Path(artifact_dir)
        cfg = read_rbln_config(artifact_dir)
        planning.reconcile_artifact(cfg, plan, npu, where=f"{artifact_dir}/{RBLN_CONFIG_FILE}")
        cls = import_model_class(model_config.architecture)
        model = cls.from_pretrained(str(artifact_dir), export=False)
        _, block = planning.attention(plan, npu)
        return RblnStaticRunner(model, plan, model_config, eos_token_ids, kv_block_size=block,
                                sort_decode=bool(cfg.get("_requires_batch_sort")),
                                seed=getattr(self.config, "seed", 0))


def read_rbln_config(artifact_dir: Path) -> dict[str, Any]:
    return read_config_file(artifact_dir, RBLN_CONFIG_FILE, "rbln")
