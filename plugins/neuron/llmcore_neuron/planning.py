"""Neuron's static plan: what optimum-neuron can compile, checked before anything is compiled.

optimum-neuron 0.4 (NxD backend) builds two graphs per model: context
encoding (one prompt, prefilled in a single pass, up to ``sequence_length``)
and token generation (one token for every one of the ``batch_size`` slots).
So a Neuron plan has exactly one batch bucket and one sequence bucket, no KV
block size, and no quantization. Everything else is :func:`plan_static`.

Derived as optimum-neuron derives it (``gqa.get_shardable_head_counts``): attention heads are
padded up to a multiple of the tensor-parallel degree, so any degree up to the core count works
(24 cores for a 64-head model compile 72 heads); :func:`padded_heads` says how many.
"""

from __future__ import annotations

from typing import Any, Iterable

from llmcore.compiled.plan import StaticPlan, plan_static
from llmcore.compiled.vendor import mismatches
from llmcore.config import normalize_dtype
from llmcore.errors import ConfigError
from llmcore.models.config import ModelConfig
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
        quantization=quantization, batch_buckets=[batch_size], seq_buckets=[max_seq_len], pad_heads=True,
    )


def padded_heads(num_heads: int, tensor_parallel: int) -> int:
    """Attention heads after optimum-neuron pads them to a multiple of the degree."""
    return -(-num_heads // tensor_parallel) * tensor_parallel


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


def recompile_command(plan: StaticPlan, model: str = "MODEL", on_device_sampling: bool = False) -> str:
    return (f"llmcore compile --device neuron --model {model} --batch-size {plan.batch_size} "
            f"--max-seq-len {plan.max_seq_len} --tensor-parallel {plan.tensor_parallel} "
            f"--dtype {plan.dtype}" + (" --on-device-sampling" if on_device_sampling else ""))


def expected_neuron_config(plan: StaticPlan, on_device_sampling: bool = False) -> dict[str, Any]:
    """The neuron_config.json fields a correct artifact for ``plan`` has."""
    return {
        "batch_size": plan.batch_size,
        "sequence_length": plan.max_seq_len,
        "max_context_length": plan.max_seq_len,
        "tp_degree": plan.tensor_parallel,
        "torch_dtype": plan.dtype,
        "continuous_batching": plan.batch_size > 1,
        "on_device_sampling": on_device_sampling,
        "speculation_length": 0,
    }


def reconcile_artifact(neuron_config: dict[str, Any], plan: StaticPlan, where: str = "neuron_config.json",
                       on_device_sampling: bool = False) -> None:
    """Refuse an artifact whose Neuron config disagrees with the plan it is served under."""
    problems = mismatches(expected_neuron_config(plan, on_device_sampling), neuron_config, where)
    if problems:
        raise ConfigError(
            "compiled", where,
            "the Neuron artifact does not match the serving plan (" + "; ".join(problems) + ")",
            f"Recompile: {recompile_command(plan, on_device_sampling=on_device_sampling)}",
        )


def plan_from_artifact(neuron_config: dict[str, Any], model_config: ModelConfig, target: str) -> StaticPlan:
    """The plan a directory saved by optimum-neuron was compiled for, read from its neuron_config.json."""
    compiled_for = neuron_config.get("target")
    if compiled_for is not None and compiled_for != sdk.COMPILE_TARGETS[target]:
        raise ConfigError("neuron_target", target,
                          f"compiles for {sdk.COMPILE_TARGETS[target]}, but neuron_config.json has target "
                          f"{compiled_for!r}", f"Serve it on a {compiled_for} instance (--neuron-target)")
    tp = neuron_config.get("tp_degree", 1)
    return plan_for(model_config, batch_size=neuron_config.get("batch_size"),
                    max_seq_len=neuron_config.get("sequence_length"), tensor_parallel=tp,
                    dtype=neuron_config.get("torch_dtype"), target=target,
                    num_cores=max(tp, sdk.TARGETS[target].max_cores))
