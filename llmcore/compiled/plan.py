"""Static-shape planning: what a compiled graph will be built for, checked up front.

Static-shape devices (Neuron, RBLN) and compiled graphs (CUDA graphs, the CPU
compiled mode) fix the batch slots and sequence lengths at compile time. A
:class:`StaticPlan` is computed from the user's settings, the model and the
device's :class:`~llmcore.capabilities.Capabilities`, validated before any
compile starts, stored in the compiled artifact's metadata, and reconciled with
the serving settings when the artifact is loaded. Nothing is silently changed:
a request that does not fit is refused, a mismatch is an error naming both
values and the command that would recompile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from llmcore.capabilities import Capabilities
from llmcore.errors import ConfigError, RequestError
from llmcore.models.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Headroom for activations, compiler scratch and runtime buffers.
ACTIVATION_OVERHEAD = 0.10


@dataclass(frozen=True, slots=True)
class StaticPlan:
    device: str
    batch_size: int  # slots: sequences served at once
    batch_buckets: tuple[int, ...]  # compiled decode batch sizes, ascending, last == batch_size
    max_seq_len: int
    seq_buckets: tuple[int, ...]  # compiled prefill lengths, ascending, last == max_seq_len
    tensor_parallel: int
    dtype: str
    quantization: str | None = None
    block_size: int | None = None  # KV block size where the device pages its KV
    weight_bytes_per_core: int = 0
    kv_bytes_per_core: int = 0
    memory_per_core: int = 0  # estimated total per core (weights + KV + overhead)
    memory_limit: int | None = None  # device's per-core memory, if known

    def bucket_for_batch(self, n: int) -> int:
        for b in self.batch_buckets:
            if n <= b:
                return b
        raise RequestError(
            "batch", n, f"exceeds the compiled batch size {self.batch_size}",
            f"Serve at most {self.batch_size} sequences at once, or recompile with --batch-size {n}",
        )

    def bucket_for_len(self, n: int) -> int:
        for b in self.seq_buckets:
            if n <= b:
                return b
        raise RequestError(
            "prompt", f"<{n} tokens>", f"is longer than the compiled max_seq_len {self.max_seq_len}",
            f"Shorten the prompt to at most {self.max_seq_len - 1} tokens, or recompile with "
            f"--max-seq-len {_next_pow2(n + 1)}",
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_buckets"] = list(self.batch_buckets)
        d["seq_buckets"] = list(self.seq_buckets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StaticPlan":
        d = dict(d)
        d["batch_buckets"] = tuple(d["batch_buckets"])
        d["seq_buckets"] = tuple(d["seq_buckets"])
        return cls(**d)

    def describe(self) -> str:
        gib = 2**30
        lines = [
            f"device            {self.device}",
            f"dtype             {self.dtype}" + (f" ({self.quantization})" if self.quantization else ""),
            f"batch slots       {self.batch_size} (decode buckets {list(self.batch_buckets)})",
            f"max sequence len  {self.max_seq_len} (prefill buckets {list(self.seq_buckets)})",
            f"tensor parallel   {self.tensor_parallel}",
        ]
        if self.block_size:
            lines.append(f"KV block size     {self.block_size}")
        mem = (
            f"memory per core   {self.memory_per_core / gib:.2f} GiB "
            f"(weights {self.weight_bytes_per_core / gib:.2f} + KV {self.kv_bytes_per_core / gib:.2f} "
            f"+ {ACTIVATION_OVERHEAD:.0%} overhead)"
        )
        if self.memory_limit:
            mem += f" of {self.memory_limit / gib:.0f} GiB"
        lines.append(mem)
        return "\n".join(lines)


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def default_batch_buckets(batch_size: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < batch_size:
        out.append(b)
        b *= 2
    out.append(batch_size)
    return tuple(out)


def _check_buckets(option: str, buckets: Iterable[int], top: int) -> tuple[int, ...]:
    vals = sorted(set(int(b) for b in buckets))
    if not vals or vals[0] <= 0:
        raise ConfigError(option, list(buckets), "must be positive integers")
    if vals[-1] > top:
        raise ConfigError(option, vals, f"contains {vals[-1]}, above the maximum {top}",
                          f"Use buckets <= {top}")
    if vals[-1] != top:
        vals.append(top)
    return tuple(vals)


def plan_static(
    model: ModelConfig,
    caps: Capabilities,
    device: str,
    *,
    batch_size: int,
    max_seq_len: int,
    dtype: str,
    tensor_parallel: int = 1,
    quantization: str | None = None,
    batch_buckets: Iterable[int] | None = None,
    seq_buckets: Iterable[int] | None = None,
    block_size: int | None = None,
    weight_bits: int | None = None,
    pad_heads: bool = False,
) -> StaticPlan:
    """Compute and validate a plan; every error names the option and what would work.

    ``pad_heads``: the device's compiler pads attention heads up to a multiple of the
    tensor-parallel degree (optimum-neuron does), so the degree need not divide them.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError("batch_size", batch_size, "must be a positive integer")
    if caps.max_batch_size and batch_size > caps.max_batch_size:
        raise ConfigError("batch_size", batch_size, f"exceeds {device}'s limit {caps.max_batch_size}")
    if not isinstance(max_seq_len, int) or max_seq_len <= 1:
        raise ConfigError("max_seq_len", max_seq_len, "must be an integer > 1")
    if max_seq_len > model.max_position_embeddings:
        raise ConfigError(
            "max_seq_len", max_seq_len,
            f"exceeds the model's max_position_embeddings ({model.max_position_embeddings})",
            f"Use --max-seq-len <= {model.max_position_embeddings}",
        )
    if caps.max_seq_len and max_seq_len > caps.max_seq_len:
        raise ConfigError("max_seq_len", max_seq_len, f"exceeds {device}'s limit {caps.max_seq_len}")
    if dtype not in caps.dtypes:
        raise ConfigError("dtype", dtype, f"is not supported on {device}",
                          f"Available on {device}: {', '.join(caps.dtypes)}")
    if quantization is not None and quantization not in caps.quantization:
        raise ConfigError("quantization", quantization, f"is not available on {device}",
                          f"Available on {device}: {', '.join(caps.quantization) or 'none'}")
    tp = tensor_parallel
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError("tensor_parallel", tp, "must be an integer >= 1")
    if tp > 1 and not caps.tensor_parallel:
        raise ConfigError("tensor_parallel", tp, f"{device} does not support tensor parallelism",
                          "Use --tensor-parallel 1")
    if tp > 1 and not caps.needs_compile:
        # torch devices (cpu, cuda) shard at run time (llmcore.parallel); a compiled artifact is one device's
        raise ConfigError("tensor_parallel", tp,
                          f"{device} shards a model at run time, not in a compiled artifact",
                          f"Compile with --tensor-parallel 1, or serve the model uncompiled with "
                          f"--tensor-parallel {tp} (llmcore generate/serve, Engine(tensor_parallel_size={tp}))")
    if tp > caps.device_count:
        raise ConfigError("tensor_parallel", tp,
                          f"exceeds the {caps.device_count} cores/devices {device} reports",
                          f"Use --tensor-parallel <= {caps.device_count}")
    if model.num_heads % tp and not pad_heads:
        divisors = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0 and d <= max(caps.device_count, 1)]
        raise ConfigError(
            "tensor_parallel", tp,
            f"does not divide the model's {model.num_heads} attention heads",
            f"Use one of: {', '.join(map(str, divisors))}",
        )
    if block_size is not None and (block_size <= 0 or max_seq_len % block_size):
        raise ConfigError("block_size", block_size, f"must divide max_seq_len={max_seq_len}")
    bb = _check_buckets("batch_buckets", batch_buckets, batch_size) if batch_buckets else default_batch_buckets(batch_size)
    sb = _check_buckets("seq_buckets", seq_buckets, max_seq_len) if seq_buckets else (max_seq_len,)

    el = DTYPE_BYTES[dtype]
    bits = weight_bits or el * 8
    weights = model.num_params() * bits // 8
    # KV heads are split across cores when they divide, else replicated
    kv_shards = tp if model.num_kv_heads % tp == 0 else 1
    kv_total = batch_size * max_seq_len * model.kv_bytes_per_token(el)
    weight_core = weights // tp
    kv_core = kv_total // kv_shards
    total = int((weight_core + kv_core) * (1 + ACTIVATION_OVERHEAD))
    limit = caps.memory_bytes
    if limit is not None and total > limit:
        gib = 2**30
        raise ConfigError(
            "batch_size/max_seq_len/tensor_parallel", f"{batch_size}/{max_seq_len}/{tp}",
            f"needs ~{total / gib:.1f} GiB per core (weights {weight_core / gib:.1f} + "
            f"KV {kv_core / gib:.1f} + overhead), more than {device}'s {limit / gib:.0f} GiB",
            "Raise --tensor-parallel, or lower --batch-size or --max-seq-len",
        )
    return StaticPlan(
        device=device, batch_size=batch_size, batch_buckets=bb, max_seq_len=max_seq_len,
        seq_buckets=sb, tensor_parallel=tp, dtype=dtype, quantization=quantization,
        block_size=block_size, weight_bytes_per_core=weight_core, kv_bytes_per_core=kv_core,
        memory_per_core=total, memory_limit=limit,
    )


RECONCILED_FIELDS = ("device", "batch_size", "max_seq_len", "tensor_parallel", "dtype", "quantization", "block_size")


def reconcile(
    compiled: StaticPlan, requested: dict[str, Any], recompile_cmd: str, *,
    names: dict[str, str] | None = None, artifact: str | None = None,
) -> None:
    """Refuse serving settings that disagree with what was compiled.

    ``requested`` holds only what the user set explicitly (unset options take
    the compiled values). The error names each mismatch with both values and
    the command that would compile what was asked for. ``names`` maps a plan
    field to the option the user set (e.g. ``max_seq_len`` -> ``max_model_len``);
    ``artifact`` names the compiled artifact in the error.
    """
    names = names or {}
    problems = []
    for name in RECONCILED_FIELDS:
        if name in requested and requested[name] is not None:
            have = getattr(compiled, name)
            if requested[name] != have:
                option = names.get(name, name)
                if option == name:
                    problems.append(f"{name}: requested {requested[name]!r}, compiled {have!r}")
                else:
                    problems.append(f"{option}: requested {requested[name]!r}, compiled {name} {have!r}")
    if problems:
        raise ConfigError(
            "compiled", artifact or compiled.device,
            "serving settings do not match the compiled artifact (" + "; ".join(problems) + ")",
            f"Drop those options to serve the artifact as compiled, or recompile: {recompile_cmd}",
        )
