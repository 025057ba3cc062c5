"""Neuron's static plan: what optimum-neuron can compile, checked before anything is compiled.

optimum-neuron 0.4 (NxD backend) builds two graphs per model: context
encoding (one prompt, prefilled in a single pass, up to ``sequence_length``)
and token generation (one token for every one of the ``batch_size`` slots).
So a Neuron plan has exactly one batch bucket and one sequence bucket, no KV
block size, and no quantization. Everything else is :func:`plan_static`.
"""

from __future__ import annotations

from typing import Any, Iterable

from llmcore.config import normalize_dtype
from llmcore.errors import ConfigError
from llmcore.models.config import ModelConfig
from llmcore.compiled.plan import StaticPlan, plan_static
from llmcore_neuron import sdk
from llmcore_neuron.sdk import capabilities

#: model_type values optimum-neuron 0.4.5 registers for text generation (NxD backend).
SUPPORTED_MODEL_TYPES = ("granite", "llama", "llama4_text", "mixtral", "phi3", "qwen2", "qwen3",
                         "qwen3_moe", "smollm3")


def plan_for(
    model_config: ModelConfig,
    *,
    batch_size: int,
    max_seq_len: int,
    tensor_parallel: int = 1,
    dtype: str | None = None,
    target: str | None = None,
    num_cores: int | None = None,
    quantization: str | None = None,
    batch_buckets: Iterable[int] | None = None,
    seq_buckets: Iterable[int] | None = None,
    block_size: int | None = None,
) -> StaticPlan:
    """The plan ``llmcore compile --device neuron`` would compile, or a ConfigError naming the option."""
    caps = capabilities(sdk.resolve_target(target), num_cores)
    check_model(model_config)
    if batch_buckets is not None and sorted(set(batch_buckets)) != [batch_size]:
        raise ConfigError(
            "batch_buckets", list(batch_buckets),
            "neuron compiles one decode graph for all batch_size slots (fewer sequences are padded)",
            "Drop --buckets",
        )
    if seq_buckets is not None and sorted(set(seq_buckets)) != [max_seq_len]:
        raise ConfigError(
            "seq_buckets", list(seq_buckets),
            "optimum-neuron 0.4 compiles one context-encoding graph of max_seq_len tokens "
            "(no prefill buckets or chunked prefill)",
            "Drop --seq-buckets",
        )
    if block_size is not None:
        raise ConfigError("block_size", block_size,
                          "neuron keeps one contiguous KV region per slot; it has no KV block size",
                          "Drop --block-size")
    dtype = caps.default_dtype if dtype in (None, "auto") else normalize_dtype(dtype)
    return plan_static(
        model_config, caps, "neuron", batch_size=batch_size, max_seq_len=max_seq_len,
        dtype=dtype, tensor_parallel=tensor_parallel,
        quantization=quantization, batch_buckets=[batch_size], seq_buckets=[max_seq_len],
    )


def check_model(model_config: ModelConfig) -> None:
    if model_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            "model", model_config.architecture,
            f"has no optimum-neuron decoder implementation (model_type {model_config.model_type!r})",
            f"Neuron serves model types: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )


def check_plan(plan: StaticPlan) -> None:
    """A plan built elsewhere (another CLI, a manifest) must still be one Neuron can compile."""
    if plan.device != "neuron":
        raise ConfigError("device", plan.device, "this plan is not for neuron")
    if plan.quantization:
        raise ConfigError("quantization", plan.quantization, "is not available on neuron",
                          "Available on neuron: none")
    if plan.batch_buckets[-1] != plan.batch_size:
        raise ConfigError("batch_buckets", list(plan.batch_buckets), f"must end at batch_size={plan.batch_size}")
    # smaller decode buckets (plan_static's default) are served by the one batch_size graph
    if tuple(plan.seq_buckets) != (plan.max_seq_len,):
        raise ConfigError("seq_buckets", list(plan.seq_buckets),
                          "optimum-neuron 0.4 has no prefill buckets", f"Use [{plan.max_seq_len}]")
    if plan.block_size is not None:
        raise ConfigError("block_size", plan.block_size, "neuron has no KV block size", "Drop it")


def recompile_command(plan: StaticPlan, model: str = "MODEL") -> str:
    return (f"llmcore compile --device neuron --model {model} --batch-size {plan.batch_size} "
            f"--max-seq-len {plan.max_seq_len} --tensor-parallel {plan.tensor_parallel} "
            f"--dtype {plan.dtype}")


def expected_neuron_config(plan: StaticPlan) -> dict[str, Any]:
    """The neuron_config.json fields a correct artifact for ``plan`` has."""
    return {
        "batch_size": plan.batch_size,
        "sequence_length": plan.max_seq_len,
        "max_context_length": plan.max_seq_len,
        "tp_degree": plan.tensor_parallel,
        "torch_dtype": plan.dtype,
        "continuous_batching": plan.batch_size > 1,
        "on_device_sampling": False,
        "speculation_length": 0,
    }


def reconcile_artifact(neuron_config: dict[str, Any], plan: StaticPlan, where: str = "neuron_config.json") -> None:
    """Refuse an artifact whose Neuron config disagrees with the plan it is served under."""
    problems = []
    for name, want in expected_neuron_config(plan).items():
        have = neuron_config.get(name, "<missing>")
        if have != want:
            problems.append(f"{name}: {where} has {have!r}, the plan has {want!r}")
    if problems:
        raise ConfigError(
            "compiled", where,
            "the Neuron artifact does not match the serving plan (" + "; ".join(problems) + ")",
            f"Recompile: {recompile_command(plan)}",
        )
