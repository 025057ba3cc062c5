"""Engine configuration: what the user asked for, validated early."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmcore.errors import ConfigError

DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def normalize_dtype(dtype: str) -> str:
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPE_ALIASES:
        raise ConfigError(
            "dtype", dtype, "is not a known dtype", "Use one of: auto, float32, bfloat16, float16"
        )
    return DTYPE_ALIASES[key]


@dataclass(slots=True)
class EngineConfig:
    """Settings for one :class:`~llmcore.Engine`.

    ``None`` means "decide from the model and device" and the decision is
    logged; nothing the user set explicitly is ever changed silently.
    """

    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    max_num_seqs: int = 64
    max_model_len: int | None = None
    block_size: int | None = None  # None = the device's default (Capabilities.default_block_size)
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes for KV; None = device's policy
    gpu_memory_utilization: float = 0.90
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_threshold: int | None = None  # max prefill tokens per sequence per step
    seed: int = 0
    compiled: str | None = None  # a compile-cache key or entry path
    enforce_eager: bool = False
    # deprecated, ignored with a warning: the CPU's Inductor-compiled decode step was removed (the
    # native step is faster); `llmcore compile` + compiled= is the compiled path
    compile_decode: bool = False
    # CPU: run decode batches through the native step (llmcore_cpu.native: one C++ call per step,
    # built at first use); the torch path when False, when it cannot run, or with enforce_eager
    native_decode: bool = True
    num_threads: int | None = None
    # shard the model over this many devices, one process per rank (llmcore.parallel)
    tensor_parallel_size: int = 1
    # overlapped engine core: launch step n+1 before reading step n's tokens (None: where the
    # device's runner offers it; True on a runner without it runs the same loop on the host,
    # which tests use; False: synchronous steps)
    async_scheduling: bool | None = None
    # detokenization, stop strings and outputs on their own thread beside the engine loop; off by
    # default: on CPython both threads need the GIL and the inline path measured faster
    # (llmcore/engine/output.py, docs/benchmarks.md)
    output_thread: bool = False
    # CPython's young-generation GC threshold while an engine runs, raised to at least this: a step
    # allocates thousands of short-lived objects (batch entries, results, outputs), and at the
    # interpreter's default (700) the collector ran several times a step, 15-30% of the engine
    # thread's time at 256 sequences (docs/benchmarks.md). Process-wide and only ever raised;
    # None leaves the interpreter's setting alone.
    gc_threshold: int | None = 20000
    progress: bool = True  # progress bars for weight loading / compile
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = normalize_dtype(self.dtype)
        for name in ("max_num_seqs", "block_size"):
            value = getattr(self, name)
            if name == "block_size" and value is None:
                continue
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(name, value, "must be a positive integer")
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise ConfigError(
                "block_size", self.block_size, "must be a power of two", "Use 8, 16 or 32 (default: the device's, 8 on the CPU and 16 on CUDA)"
            )
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError("max_model_len", self.max_model_len, "must be a positive integer")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ConfigError("num_kv_blocks", self.num_kv_blocks, "must be a positive integer")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0:
            raise ConfigError(
                "max_num_batched_tokens", self.max_num_batched_tokens, "must be a positive integer"
            )
        if self.gc_threshold is not None and (
                isinstance(self.gc_threshold, bool) or not isinstance(self.gc_threshold, int) or self.gc_threshold <= 0):
            raise ConfigError("gc_threshold", self.gc_threshold, "must be a positive integer or None",
                              "Use 20000 (the default), or None to leave Python's GC thresholds alone")
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(
                "tensor_parallel_size", tp, "must be an integer >= 1",
                "Use 1 (one device) or the number of devices to shard the model over",
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                "gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]"
            )
