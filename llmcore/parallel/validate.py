"""Which tensor-parallel sizes work, checked before any weight is loaded (no torch import).

Every refusal names the option, the value, the reason and the sizes that would work.
"""

from __future__ import annotations

from typing import Any

from llmcore.errors import ConfigError

OPTION = "tensor_parallel_size"


def tensor_parallel_sizes(model: Any, limit: int | None = None) -> list[int]:
    """Sizes ``N <= limit`` that split ``model`` evenly: attention heads, KV heads and the MLP.

    ``limit`` None: every size the model allows (at most its number of KV heads).
    """
    top = model.num_kv_heads if limit is None else max(int(limit), 1)
    return [
        n for n in range(1, top + 1)
        if model.num_heads % n == 0 and model.num_kv_heads % n == 0 and model.intermediate_size % n == 0
    ]


def check_divides(n: int, model: Any, limit: int | None = None, option: str = OPTION,
                  what: str = "devices") -> None:
    """Refuse ``n`` when it does not divide the heads, the KV heads and the MLP width."""
    bad = []
    if model.num_heads % n:
        bad.append(f"num_attention_heads={model.num_heads}")
    if model.num_kv_heads % n:
        bad.append(f"num_key_value_heads={model.num_kv_heads}")
    if model.intermediate_size % n:
        bad.append(f"intermediate_size={model.intermediate_size}")
    if bad:
        ok = tensor_parallel_sizes(model, limit)
        where = f" (with {limit} {what.split(' (')[0]} here)" if limit is not None else ""
        raise ConfigError(
            option, n,
            f"does not divide the model's {', '.join(bad)}: each rank holds 1/{n} of the attention "
            "heads, of the KV heads and of the MLP",
            f"Use one of: {', '.join(map(str, ok))}{where}",
        )


def validate_tensor_parallel(n: Any, model: Any, device: Any, *, quantization: str | None = None,
                             option: str = OPTION) -> None:
    """Check ``tensor_parallel_size=n`` for ``model`` (a ModelConfig) on ``device`` (a Device).

    Run-time tensor parallelism (:mod:`llmcore.parallel.executor`) needs a device that opts in
    with ``Device.tensor_parallel_backend`` (cpu: gloo, cuda: NCCL). Static-shape devices
    (neuron, rbln) shard in their compiled plan instead: ``llmcore compile --tensor-parallel N``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(option, n, "must be an integer >= 1",
                          "Use 1 (one device) or the number of devices to shard the model over")
    if n == 1:
        return
    caps = device.capabilities
    name = device.name
    if caps.needs_compile or caps.static_shapes:
        raise ConfigError(
            option, n, f"{name} shards a model in its compiled plan, not at run time",
            f"Compile with: llmcore compile --device {name} --tensor-parallel {n} --batch-size B "
            "--max-seq-len S, then serve the artifact with compiled=KEY (--compiled KEY)",
        )
    if getattr(device, "tensor_parallel_backend", None) is None:
        raise ConfigError(option, n, f"device {name!r} does not support tensor parallelism",
                          "Use tensor_parallel_size=1 here, or a device that supports it (cuda; cpu for testing)")
    if quantization is not None:
        raise ConfigError(
            option, n, f"cannot be combined with quantization={quantization!r} yet (quantized layers are "
            "not sharded)", "Use tensor_parallel_size=1 with quantization, or an unquantized model with "
            "tensor parallelism",
        )
    limit, what = device.tensor_parallel_limit()
    check_divides(n, model, limit, option, what)
    if n > limit:
        ok = tensor_parallel_sizes(model, limit)
        raise ConfigError(option, n, f"exceeds the {limit} {what} {name} has here",
                          f"Use one of: {', '.join(map(str, ok))}")
