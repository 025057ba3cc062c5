"""RBLN's static plan: what optimum-rbln can compile, checked before anything is compiled.

optimum-rbln 0.12 compiles a decoder into one prefill graph (batch 1,
``prefill_chunk_size`` tokens, run chunk by chunk over the prompt) and one
decode graph per ``decoder_batch_sizes`` entry. The KV cache lives on the
NPU in ``kvcache_num_blocks`` blocks of ``kvcache_block_size`` tokens, and the
block size decides the attention kernel:

* ``kvcache_block_size == max_seq_len``: eager attention (max_seq_len capped
  per NPU family);
* smaller: flash attention with ``kvcache_partition_len == kvcache_block_size``
  (a partition length in the family's range, dividing max_seq_len at least twice).

A plan maps onto that as: ``batch_buckets`` -> ``decoder_batch_sizes``,
``block_size`` -> KV block size / partition length, ``tensor_parallel`` ->
``num_devices``, ``quantization`` -> ``rbln_quantization``. Each slot owns
``max_seq_len / block_size`` blocks, so ``kvcache_num_blocks`` is set to
``batch_size * max_seq_len / block_size`` (the KV the plan's memory estimate counts).

Derived the way optimum-rbln derives them (checked against its own code by the golden files in
tests/rbln/golden): a quantized checkpoint compiles in float32 (activations and KV), so its plan's
dtype is float32; a model with ``sliding_window`` set and ``use_sliding_window`` not false compiles
``cache_impl="sliding_window"`` (a local KV window, no ``block_tables``), which llmcore's runner does
not drive, so it is refused; ``num_devices`` and ``npu`` are saved only inside ``_compile_cfgs``.
"""

from __future__ import annotations

from typing import Any, Iterable

from llmcore.compiled.plan import StaticPlan, plan_static
from llmcore.compiled.vendor import mismatches
from llmcore.config import normalize_dtype
from llmcore.errors import ConfigError
from llmcore.models.config import ModelConfig
from llmcore_rbln import quantization as quant
from llmcore_rbln import sdk
from llmcore_rbln.sdk import capabilities

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
#: optimum-rbln 0.12 get_quantized_model: "rebel compiler does not support bfloat16 for quantized models"
QUANTIZED_DTYPE = "float32"


def plan_for(
    model_config: ModelConfig,
    *,
    batch_size: int,
    max_seq_len: int,
    tensor_parallel: int = 1,
    dtype: str | None = None,
    block_size: int | None = None,
    batch_buckets: Iterable[int] | None = None,
    seq_buckets: Iterable[int] | None = None,
    quantization: str | None = None,
    npu: str | None = None,
    num_devices: int | None = None,
    prefill_chunk_size: int | None = None,
) -> StaticPlan:
    """The plan ``llmcore compile --device rbln`` would compile, or a ConfigError naming the option."""
    npu, _ = sdk.resolve_npu(npu)
    fam = sdk.family(npu)
    caps = capabilities(npu, num_devices)
    check_model(model_config)
    if seq_buckets is not None and sorted(set(seq_buckets)) != [max_seq_len]:
        raise ConfigError(
            "seq_buckets", list(seq_buckets),
            "rbln prefills any prompt length chunk by chunk (prefill_chunk_size); it has no prefill buckets",
            "Drop --seq-buckets; set rbln_prefill_chunk_size to change the chunk",
        )
    check_prefill_chunk(prefill_chunk_size)
    weight_bits = None
    if quantization is not None:
        weight_bits = quant.method(quantization).weight_bits
        if dtype not in (None, "auto") and normalize_dtype(dtype) != QUANTIZED_DTYPE:
            raise ConfigError("dtype", dtype, f"optimum-rbln compiles {quantization} checkpoints in "
                              f"{QUANTIZED_DTYPE} (activations and KV cache)", f"Use --dtype {QUANTIZED_DTYPE} or auto")
        dtype = QUANTIZED_DTYPE
    dtype = caps.default_dtype if dtype in (None, "auto") else normalize_dtype(dtype)
    if isinstance(max_seq_len, int) and max_seq_len > 1:
        block_size = resolve_block_size(block_size, max_seq_len, fam)
    return plan_static(
        model_config, caps, "rbln", batch_size=batch_size, max_seq_len=max_seq_len, dtype=dtype,
        tensor_parallel=tensor_parallel, quantization=quantization,
        batch_buckets=list(batch_buckets) if batch_buckets else [batch_size],
        seq_buckets=[max_seq_len], block_size=block_size, weight_bits=weight_bits,
    )


def check_model(model_config: ModelConfig) -> None:
    if model_config.architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError("model", model_config.architecture, "is not served on rbln by this plugin",
                          f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if sdk_cache_impl(model_config.raw) != "static":
        window = model_config.raw.get("sliding_window")
        raise ConfigError(
            "model", model_config.architecture,
            f"has sliding_window={window} and use_sliding_window={model_config.raw.get('use_sliding_window')!r}: "
            "optimum-rbln compiles it with a sliding-window KV cache (cache_impl='sliding_window', "
            "local block tables), which this plugin's fixed-slot runner does not drive",
            "Set \"use_sliding_window\": false in the model's config.json if max_seq_len <= sliding_window "
            "(the window never slides), or serve the model on cpu/cuda",
        )


def sdk_cache_impl(hf_config: dict[str, Any]) -> str:
    """optimum-rbln 0.12's ``cache_impl`` for a Hugging Face config (``_update_rbln_config``):
    a missing ``use_sliding_window`` counts as true."""
    layer_types = hf_config.get("layer_types")
    all_full = layer_types is not None and all(t == "full_attention" for t in layer_types)
    if hf_config.get("sliding_window") is None or not hf_config.get("use_sliding_window", True) or all_full:
        return "static"
    if layer_types is not None and not all(t == "sliding_attention" for t in layer_types):
        return "hybrid"
    return "sliding_window"


def check_prefill_chunk(chunk: int | None) -> None:
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0 or chunk % 64):
        raise ConfigError("rbln_prefill_chunk_size", chunk, "must be a positive multiple of 64",
                          "Use 128 (ATOM default) or 512 (REBEL default)")


def resolve_block_size(block_size: int | None, max_seq_len: int, fam: sdk.NpuFamily) -> int:
    """The KV block size: max_seq_len (eager) or a flash-attention partition length."""
    flash_hint = (
        f"Use --block-size {max_seq_len} (eager attention, max_seq_len <= {fam.max_eager_seq_len}) or a "
        f"flash-attention partition length in {fam.min_partition_len}..{fam.max_partition_len} that "
        f"divides max_seq_len at least twice"
    )
    if block_size is None:
        if max_seq_len <= fam.max_eager_seq_len:
            return max_seq_len
        block_size = fam.default_partition_len
    if block_size == max_seq_len:
        if max_seq_len > fam.max_eager_seq_len:
            raise ConfigError("block_size", block_size,
                              f"eager attention on {fam.name} allows max_seq_len <= {fam.max_eager_seq_len}",
                              flash_hint)
        return block_size
    if not fam.min_partition_len <= block_size <= fam.max_partition_len:
        raise ConfigError("block_size", block_size,
                          f"is not a flash-attention partition length on {fam.name} "
                          f"({fam.min_partition_len}..{fam.max_partition_len})", flash_hint)
    if max_seq_len % block_size or max_seq_len < 2 * block_size:
        raise ConfigError("block_size", block_size,
                          f"must divide max_seq_len={max_seq_len} at least twice for flash attention",
                          flash_hint)
    return block_size


def check_plan(plan: StaticPlan, npu: str) -> None:
    """A plan built elsewhere (another CLI, a manifest) must still be one RBLN can compile."""
    if plan.device != "rbln":
        raise ConfigError("device", plan.device, "this plan is not for rbln")
    if tuple(plan.seq_buckets) != (plan.max_seq_len,):
        raise ConfigError("seq_buckets", list(plan.seq_buckets), "rbln has no prefill buckets",
                          f"Use [{plan.max_seq_len}]")
    if plan.quantization is not None:
        quant.method(plan.quantization)
    resolve_block_size(plan.block_size, plan.max_seq_len, sdk.family(npu))


def attention(plan: StaticPlan, npu: str) -> tuple[str, int]:
    block = resolve_block_size(plan.block_size, plan.max_seq_len, sdk.family(npu))
    return ("eager" if block == plan.max_seq_len else "flash_attn"), block


def num_kv_blocks(plan: StaticPlan, block: int) -> int:
    return plan.batch_size * (plan.max_seq_len // block)


def sdk_kwargs(plan: StaticPlan, npu: str, pass_npu: bool, prefill_chunk_size: int | None) -> dict[str, Any]:
    """The ``rbln_*`` keyword arguments of ``RBLN<Arch>.from_pretrained(..., export=True)``."""
    attn, block = attention(plan, npu)
    kw: dict[str, Any] = {
        "rbln_batch_size": plan.batch_size,
        "rbln_max_seq_len": plan.max_seq_len,
        "rbln_num_devices": plan.tensor_parallel,
        "rbln_attn_impl": attn,
        "rbln_kvcache_block_size": block,
        "rbln_kvcache_num_blocks": num_kv_blocks(plan, block),
        "rbln_decoder_batch_sizes": sorted(plan.batch_buckets, reverse=True),
        # compile only: runtimes are created when the artifact is served
        "rbln_create_runtimes": False,
    }
    if attn == "flash_attn":
        kw["rbln_kvcache_partition_len"] = block
    if prefill_chunk_size is not None:
        kw["rbln_prefill_chunk_size"] = prefill_chunk_size
    if pass_npu:
        kw["rbln_npu"] = npu
    if plan.quantization is not None:
        kw["rbln_quantization"] = quant.method(plan.quantization).sdk_config()
    return kw


def recompile_command(plan: StaticPlan, model: str = "MODEL") -> str:
    cmd = (f"llmcore compile --device rbln --model {model} --batch-size {plan.batch_size} "
           f"--max-seq-len {plan.max_seq_len} --tensor-parallel {plan.tensor_parallel} --dtype {plan.dtype}")
    if plan.quantization:
        cmd += f" --quantization {plan.quantization}"
    return cmd


def saved_devices(cfg: dict[str, Any]) -> tuple[int | None, str | None]:
    """(num_devices, npu) of a saved rbln_config.json: optimum-rbln keeps them in every
    ``_compile_cfgs`` entry (they are not saved at the top level); releases before 0.12 wrote
    ``tensor_parallel_size``."""
    entries = [c for c in cfg.get("_compile_cfgs") or [] if isinstance(c, dict)]
    devices = {c.get("num_devices") for c in entries} or {cfg.get("num_devices", cfg.get("tensor_parallel_size"))}
    npus = {c.get("npu") for c in entries} or {cfg.get("npu")}
    if len(devices) > 1:
        raise ConfigError("compiled", "rbln_config.json", f"its compiled graphs disagree on num_devices ({sorted(devices)})",
                          "Recompile the artifact")
    n = devices.pop()
    return (1 if n is None else n), (npus.pop() if len(npus) == 1 else None)


def reconcile_artifact(cfg: dict[str, Any], plan: StaticPlan, npu: str, where: str = "rbln_config.json") -> None:
    """Refuse an artifact whose rbln_config.json disagrees with the plan it is served under."""
    attn, block = attention(plan, npu)
    want: dict[str, Any] = {
        "batch_size": plan.batch_size,
        "max_seq_len": plan.max_seq_len,
        "num_devices": plan.tensor_parallel,
        "kvcache_block_size": block,
        "attn_impl": attn,
        "decoder_batch_sizes": sorted(plan.batch_buckets, reverse=True),
        "cache_impl": "static",
        "dtype": plan.dtype,
    }
    have = dict(cfg)
    have["num_devices"], _ = saved_devices(cfg)
    have.setdefault("cache_impl", "static")
    problems = mismatches(want, have, where)
    m = quant.method(plan.quantization) if plan.quantization else None
    q = have.get("quantization") or {}
    if m is None and q:
        problems.append(f"quantization: {where} has {q!r}, the plan has none")
    elif m is not None and (q.get("weights"), q.get("activations")) != (m.weights, m.activations):
        problems.append(f"quantization: {where} has {q or None!r}, the plan has {plan.quantization} "
                        f"(weights {m.weights}, activations {m.activations})")
    blocks = have.get("kvcache_num_blocks", 0)
    if isinstance(blocks, int) and blocks < num_kv_blocks(plan, block):
        problems.append(f"kvcache_num_blocks: {where} has {blocks}, fixed slots need "
                        f"{num_kv_blocks(plan, block)} (batch_size x max_seq_len / kvcache_block_size)")
    if problems:
        raise ConfigError(
            "compiled", where,
            "the RBLN artifact does not match the serving plan (" + "; ".join(problems) + ")",
            f"Recompile: {recompile_command(plan)}",
        )


def plan_from_artifact(cfg: dict[str, Any], model_config: ModelConfig, npu: str | None = None) -> StaticPlan:
    """The plan a directory saved by optimum-rbln was compiled for, read from its rbln_config.json."""
    num_devices, saved_npu = saved_devices(cfg)
    q = cfg.get("quantization") or {}
    method = next((m.name for m in quant.METHODS.values()
                   if (m.weights, m.activations) == (q.get("weights"), q.get("activations"))), None)
    if q and method is None:
        raise ConfigError("quantization", q, "is not an RBLN method this plugin serves",
                          f"Available on rbln: {', '.join(quant.METHODS)}")
    return plan_for(
        model_config, batch_size=cfg.get("batch_size"), max_seq_len=cfg.get("max_seq_len"),
        tensor_parallel=num_devices, dtype=cfg.get("dtype"), block_size=cfg.get("kvcache_block_size"),
        batch_buckets=cfg.get("decoder_batch_sizes"), quantization=method, npu=npu or saved_npu,
        num_devices=max(num_devices, sdk.DEFAULT_PLANNING_DEVICES),
    )
