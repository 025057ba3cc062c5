"""A stand-in for ``optimum.rbln`` 0.12.0, shaped like its decoder-only API, for contract tests.

Injected with ``monkeypatch.setitem(sys.modules, ...)`` for one test, never
installed. It keeps the signatures of the real entry points
(``RBLN<Arch>ForCausalLM.from_pretrained``, ``save_pretrained`` and the
``RBLNRuntimeModel`` forward of ``prefill_decoder`` / ``decoders[n]``),
records every call bound to those signatures, and applies the SDK's rules:
the ``rbln_*`` keys it accepts (anything else is "Unexpected arguments"),
the attention constraints per NPU family, decoder batch sizes, quantization
fields, the tensor dtypes and shapes the compiled graphs take.

The NPU is emulated with Hugging Face transformers on the CPU: the KV cache is
``kvcache_num_blocks`` blocks of ``kvcache_block_size`` token slots, written
through the block tables the caller passes; logits are those of the model on
the tokens read back through those tables. A runner whose block tables
overlap, or that decodes at the wrong position, gets wrong logits or an error.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VERSION = "0.12.0"
ATOM = dict(max_eager=32_768, min_part=1_024, max_part=32_768, default_part=16_384, chunk=128)
REBEL = dict(max_eager=16_384, min_part=1_024, max_part=16_384, default_part=8_192, chunk=512)
# RBLNDecoderOnlyModelConfig + RBLNModelConfig keyword arguments in 0.12.0
CONFIG_KEYS = {
    "batch_size", "max_seq_len", "use_inputs_embeds", "use_attention_mask", "use_position_ids", "attn_impl",
    "kvcache_partition_len", "kvcache_block_size", "quantization", "lora_config", "prefill_chunk_size",
    "kvcache_num_blocks", "memory_budget", "decoder_batch_sizes", "cache_impl", "sliding_window",
    "sliding_window_layers", "phases", "logits_to_keep", "output_hidden_states", "cache_metas",
    "cls_name", "create_runtimes", "device", "device_map", "activate_profiler", "npu", "num_devices",
    "timeout", "optimum_rbln_version", "dtype",
}
DEPRECATED_KEYS = {"tensor_parallel_size": "num_devices", "kvcache_metas": "cache_metas"}
RUNTIME_KEYS = {"create_runtimes", "device", "device_map", "activate_profiler", "timeout"}
NON_SAVED_KEYS = {"npu", "num_devices"}  # saved inside each _compile_cfgs entry only
QUANT = dict(weights=("int4", "int8", "fp8", "fp16"), activations=("int8", "fp8", "fp16"), kv_caches=("fp8", "fp16"))
SCALE_SUFFIXES = (".weight_scale", ".scales", ".w_scale", ".scale")


class ContractError(AssertionError):
    """The plugin called the stand-in in a way the real SDK would not accept."""


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.warnings: list[str] = []

    def record(self, fn, name: str, *args, **kwargs) -> dict[str, Any]:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("cls", None)
        arguments.pop("self", None)
        self.calls.append((name, arguments))
        return arguments

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def last(self, name: str) -> dict[str, Any]:
        for n, args in reversed(self.calls):
            if n == name:
                return args
        raise KeyError(name)


@dataclass
class RBLNDecoderOnlyOutput:
    logits: torch.Tensor | None = None
    generate_idx: torch.Tensor | None = None
    padded_cache_lengths: int | None = None
    hidden_states: tuple | None = None


def _limits(npu: str | None) -> dict[str, int]:
    if npu is None or npu.startswith("RBLN-CA"):
        return ATOM
    if npu.startswith("RBLN-CR"):
        return REBEL
    raise ValueError(f"Unknown npu name: {npu}")


def _requires_batch_sort(npu: str | None, attn_impl: str, use_attention_mask: bool) -> bool:
    m = re.match(r"RBLN-CR(\d+)", npu or "")
    return bool(m) and int(m.group(1)[:2]) >= 13 and attn_impl == "flash_attn" and not use_attention_mask


def resolve_config(cfg: dict[str, Any], hf_config, dtype: str) -> dict[str, Any]:
    """What RBLNDecoderOnlyModelForCausalLM._update_rbln_config resolves, and the errors it raises."""
    out = dict(cfg)
    out.setdefault("batch_size", 1)
    if not isinstance(out["batch_size"], int) or out["batch_size"] < 0:
        raise ValueError(f"batch_size must be a positive integer, got {out['batch_size']}")
    if out.get("max_seq_len") is None:
        out["max_seq_len"] = getattr(hf_config, "max_position_embeddings", None)
    L = out["max_seq_len"]
    lim = _limits(out.get("npu"))
    attn, part, block = out.get("attn_impl") or "eager", out.get("kvcache_partition_len"), out.get("kvcache_block_size")
    chunk = out.get("prefill_chunk_size") or lim["chunk"]
    if chunk % 64 or chunk <= 0:
        raise ValueError("`prefill_chunk_size` must be a positive integer divisible by 64.")
    if part is not None and attn == "eager":
        attn = "flash_attn"
    if part is None and attn == "flash_attn":
        part = lim["default_part"]
    if block is None:
        block = L if attn == "eager" else part
    if attn == "eager" and L > lim["max_eager"]:
        raise ValueError(f"`max_seq_len` is set to {L}, which exceeds the limit of {lim['max_eager']} for 'eager'")
    if attn == "flash_attn":
        if L // part < 2 or L % part:
            raise ValueError(f"`max_seq_len` ({L}) must be a multiple of `kvcache_partition_len` ({part})")
        if not lim["min_part"] <= part <= lim["max_part"]:
            raise ValueError(f"`kvcache_partition_len` ({part}) is out of the supported range")
        if block != part:
            raise ValueError("When using 'flash attention', the `kvcache_block_size` must equal the partition length")
    elif block != L:
        raise ValueError(f"When using 'eager attention', the `kvcache_block_size` ({block}) must equal `max_seq_len` {L}")
    full = (L // block) * out["batch_size"]
    blocks = out.get("kvcache_num_blocks") or 0
    if blocks == 0:
        if attn == "flash_attn":
            raise RuntimeError("No NPU is available to get available DRAM size.")  # auto-estimation needs one
        blocks = full
    elif attn == "flash_attn" and blocks < min(max(L // block, out["batch_size"]) + 1, full):
        raise ValueError(f"The set `kvcache_num_blocks` ({blocks}) is less than the minimum number of blocks")
    dbs = out.get("decoder_batch_sizes") or [out["batch_size"]]
    if max(dbs) > out["batch_size"]:
        raise ValueError(f"Decoder batch size ({max(dbs)}) must be less than or equal to the runtime batch size")
    if max(dbs) < out["batch_size"]:
        dbs = dbs + [out["batch_size"]]
    q = out.get("quantization") or {}
    if q:
        q = {"format": q.get("format") or "rbln", "weights": q.get("weights") or "fp16",
             "activations": q.get("activations") or "fp16", "kv_caches": q.get("kv_caches") or "fp16"}
        for field, allowed in QUANT.items():
            if q[field] not in allowed:
                raise ValueError(f"Invalid {field}: {q[field]}, supported {field} are: {list(allowed)}")
        if q["weights"] == "fp16" and q["activations"] == "fp16":
            raise ValueError("weights and activations of QuantizationConfig cannot be both fp16.")
    use_mask = bool(out.get("use_attention_mask"))
    out.update(
        attn_impl=attn, kvcache_partition_len=part, kvcache_block_size=block, prefill_chunk_size=chunk,
        kvcache_num_blocks=blocks, decoder_batch_sizes=sorted(dbs, reverse=True), quantization=q,
        use_attention_mask=use_mask, use_position_ids=bool(out.get("use_position_ids")),
        use_inputs_embeds=bool(out.get("use_inputs_embeds")), cache_impl="static", phases=["prefill", "decode"],
        logits_to_keep=1, output_hidden_states=False, dtype=dtype, optimum_rbln_version=VERSION,
        _requires_batch_sort=_requires_batch_sort(out.get("npu"), attn, use_mask),
        _compile_cfgs=[{"compiled_model_name": n, "npu": out.get("npu"), "num_devices": out.get("num_devices")}
                       for n in ["prefill"] + [f"decoder_batch_{b}" for b in sorted(dbs, reverse=True)]],
    )
    for k in RUNTIME_KEYS | NON_SAVED_KEYS:  # as RBLNModelConfig.non_save_attributes (golden files)
        out.pop(k, None)
    return out


class RBLNDecoderOnlyModelForCausalLM:
    """Class methods keep optimum-rbln 0.12.0's signatures; one subclass per architecture."""

    recorder: Recorder
    hf_architecture = ""

    @classmethod
    def from_pretrained(cls, model_id, export=None, rbln_config=None, **kwargs):
        cls.recorder.record(cls.from_pretrained.__func__, "from_pretrained", cls, model_id, export=export,
                            rbln_config=rbln_config, **kwargs)
        path = Path(model_id)
        if not path.is_dir():
            raise ContractError(f"{model_id}: a hub id would be downloaded; llmcore passes local folders")
        if export is None:
            raise ContractError("export=None makes the SDK guess from the folder; pass export=True/False")
        rbln = {k[5:]: kwargs.pop(k) for k in list(kwargs) if k.startswith("rbln_")}
        if isinstance(rbln_config, dict):
            rbln = {**rbln_config, **rbln}
        for old, new in DEPRECATED_KEYS.items():
            if old in rbln:
                cls.recorder.warnings.append(f"`{old}` is deprecated and will be removed in version 0.13.0. Use `{new}`")
                rbln[new] = rbln.pop(old)
        unexpected = set(rbln) - CONFIG_KEYS
        if unexpected:
            raise ValueError(f"Unexpected arguments: {sorted(unexpected)}")
        return cls._export(path, rbln, kwargs) if export else cls._load(path, rbln, kwargs)

    @classmethod
    def _export(cls, path: Path, rbln: dict[str, Any], hf_kwargs: dict[str, Any]):
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(path))
        if hf_config.architectures[0] != cls.hf_architecture:
            raise ContractError(f"{cls.__name__} used for a {hf_config.architectures[0]} checkpoint")
        extra = set(hf_kwargs) - {"dtype"}
        if extra:
            raise ContractError(f"{sorted(extra)} would go to transformers' from_pretrained; llmcore passes dtype only")
        if rbln.get("quantization"):
            if "dtype" in hf_kwargs:
                cls.recorder.warnings.append("dtype is not supported for quantized models. It will be ignored")
            files = sorted(path.glob("*.safetensors"))
            names = [n for f in files for n in _safetensors_names(f)]
            if not any(n.endswith(SCALE_SUFFIXES) for n in names):
                raise KeyError("quantized checkpoint without weight scales")
            dtype = "float32"  # the SDK compiles quantized models with float32 scales
        else:
            torch_dtype = hf_kwargs.get("dtype")
            if not isinstance(torch_dtype, torch.dtype):
                raise ContractError(f"dtype={torch_dtype!r}: transformers 5 would load the checkpoint's own dtype")
            dtype = str(torch_dtype).split(".")[1]
        cfg = resolve_config(rbln, hf_config, dtype)
        cfg["cls_name"] = f"{cls.__name__}Config"
        model = cls(hf_config, cfg, weights=sorted(path.glob("*.safetensors")), create_runtimes=False)
        return model

    @classmethod
    def _load(cls, path: Path, rbln: dict[str, Any], hf_kwargs: dict[str, Any]):
        from transformers import AutoConfig

        if hf_kwargs:
            raise ContractError(f"loading a compiled model takes no transformers kwargs, got {sorted(hf_kwargs)}")
        cfg = json.loads((path / "rbln_config.json").read_text())
        if cfg.get("cls_name") != f"{cls.__name__}Config":
            raise ValueError(f"Expected {cls.__name__}Config, but got {cfg.get('cls_name')}")
        for k, v in rbln.items():
            if k not in RUNTIME_KEYS and cfg.get(k) != v:
                raise ValueError(f"Cannot set the following arguments: {[k]} Since the value is already set")
        for entry in cfg["_compile_cfgs"]:
            if not (path / f"{entry['compiled_model_name']}.rbln").is_file():
                raise FileNotFoundError(f"{entry['compiled_model_name']}.rbln is missing in {path}")
        if cfg.get("quantization"):
            raise ContractError("the stand-in does not emulate quantized compute")
        return cls(AutoConfig.from_pretrained(str(path)), cfg, weights=[path / "prefill.rbln"],
                   create_runtimes=rbln.get("create_runtimes", True), config_dir=path)

    def __init__(self, config, cfg: dict[str, Any], weights: list[Path], create_runtimes: bool,
                 config_dir: Path | None = None) -> None:
        self.config = config
        self.rbln_config = types.SimpleNamespace(**{k.lstrip("_"): v for k, v in cfg.items()})
        self._cfg = cfg
        self._weights = weights
        self.prefill_decoder = None
        self.decoders: dict[int, StandinRuntime] = {}
        if create_runtimes:
            from llmcore.testing.reference import HFReference

            reference = HFReference.from_files(config_dir, weights[0])
            kv = PagedKV(cfg["kvcache_num_blocks"], cfg["kvcache_block_size"])
            self.prefill_decoder = StandinRuntime("prefill", 1, cfg, kv, reference, self.recorder)
            self.decoders = {b: StandinRuntime("decode", b, cfg, kv, reference, self.recorder)
                             for b in cfg["decoder_batch_sizes"]}
            self.decoder = self.decoders[cfg["batch_size"]]

    def save_pretrained(self, save_directory, push_to_hub=False, **kwargs):
        self.recorder.record(type(self).save_pretrained, "save_pretrained", self, save_directory,
                             push_to_hub=push_to_hub, **kwargs)
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        if len(self._weights) != 1:
            raise ContractError("the stand-in expects one safetensors file")
        # the stand-in's "compiled" prefill graph is the weights themselves (safetensors)
        shutil.copyfile(self._weights[0], out / "prefill.rbln")
        for b in self._cfg["decoder_batch_sizes"]:
            (out / f"decoder_batch_{b}.rbln").write_bytes(b"stand-in decode graph")
        (out / "rbln_config.json").write_text(json.dumps(self._cfg, indent=2))
        self.config.save_pretrained(str(out))


class PagedKV:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [[None] * block_size for _ in range(num_blocks)]

    def write(self, table: list[int], pos: int, token: int) -> None:
        self.blocks[self._block(table, pos)][pos % self.block_size] = token

    def read(self, table: list[int], upto: int) -> list[int]:
        tokens = [self.blocks[self._block(table, p)][p % self.block_size] for p in range(upto + 1)]
        if None in tokens:
            raise ContractError(f"attention reads KV position {tokens.index(None)}, never written through "
                                f"block table {table}")
        return tokens

    def _block(self, table: list[int], pos: int) -> int:
        block = table[pos // self.block_size]
        if not 0 <= block < len(self.blocks):
            raise ContractError(f"block id {block} outside 0..{len(self.blocks) - 1}")
        return block


class StandinRuntime:
    """RBLNRuntimeModel's forward, in external-block-table mode."""

    def __init__(self, phase, batch_size, cfg, kv: PagedKV, reference, recorder) -> None:
        self.phase, self.batch_size, self.cfg, self.kv = phase, batch_size, cfg, kv
        self.reference, self.recorder = reference, recorder
        self.max_blocks = cfg["max_seq_len"] // cfg["kvcache_block_size"]

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids=None, inputs_embeds=None, cache_position=None, attention_mask=None, batch_idx=None,
                block_tables=None, position_embed=None, position_ids=None, token_type_ids=None,
                local_block_tables=None, lora_int_ids=None):
        args = self.recorder.record(StandinRuntime.forward, f"{self.phase}[{self.batch_size}]", self,
                                    input_ids=input_ids, inputs_embeds=inputs_embeds, cache_position=cache_position,
                                    attention_mask=attention_mask, batch_idx=batch_idx, block_tables=block_tables,
                                    position_embed=position_embed, position_ids=position_ids,
                                    token_type_ids=token_type_ids, local_block_tables=local_block_tables,
                                    lora_int_ids=lora_int_ids)
        unused = [k for k, v in args.items() if v is not None and k not in ("input_ids", "cache_position", "block_tables")]
        if unused:
            raise ContractError(f"{unused} are for features this artifact was not compiled with")
        if block_tables is None:
            raise ContractError("no block_tables: the SDK would use its internal page table, which maps "
                                "row i to batch slot i and frees a slot's blocks on every prefill")
        _check_tensor("input_ids", input_ids, torch.int64)
        _check_tensor("cache_position", cache_position, torch.int32)
        _check_tensor("block_tables", block_tables, torch.int16)
        dtype = getattr(torch, self.cfg["dtype"])
        if self.phase == "prefill":
            return self._prefill(input_ids, cache_position, block_tables, dtype)
        return self._decode(input_ids, cache_position, block_tables, dtype)

    def _prefill(self, input_ids, cache_position, block_tables, dtype):
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ContractError(f"prefill takes input_ids [1, n], got {tuple(input_ids.shape)}")
        n = input_ids.shape[1]
        if n > self.cfg["max_seq_len"]:
            raise ValueError(f"Input length ({n}) exceeds the maximum allowed sequence length")
        if cache_position.tolist() != [list(range(n))]:
            raise ContractError(f"cache_position must be [[0..{n - 1}]] (no prefix caching), got {cache_position.tolist()}")
        if tuple(block_tables.shape) != (self.max_blocks,):
            raise ContractError(f"prefill block_tables must be [{self.max_blocks}], got {tuple(block_tables.shape)}")
        table = block_tables.tolist()
        for pos, token in enumerate(input_ids[0].tolist()):
            self.kv.write(table, pos, token)
        logits = self.reference.next_logits(self.kv.read(table, n - 1))
        return RBLNDecoderOnlyOutput(logits=logits.to(dtype).view(1, 1, -1), padded_cache_lengths=0)

    def _decode(self, input_ids, cache_position, block_tables, dtype):
        b = input_ids.shape[0]
        if b != self.batch_size:
            raise RuntimeError(f"Batch size mismatch: got {b}, expected {self.batch_size} (compiled batch size).")
        if tuple(input_ids.shape) != (b, 1) or tuple(cache_position.shape) != (b, 1):
            raise ContractError(f"decode takes input_ids/cache_position [{b}, 1], got "
                                f"{tuple(input_ids.shape)}/{tuple(cache_position.shape)}")
        if tuple(block_tables.shape) != (b, self.max_blocks):
            raise ContractError(f"decode block_tables must be [{b}, {self.max_blocks}], got {tuple(block_tables.shape)}")
        positions = cache_position[:, 0].tolist()
        if max(positions) >= self.cfg["max_seq_len"]:
            raise ValueError("Cache position exceeds the maximum sequence length.")
        if b > 1 and self.cfg.get("_requires_batch_sort") and positions != sorted(positions, reverse=True):
            raise ValueError("decode batches must be sorted by sequence length (descending), "
                             f"but got cache_position {positions}")
        tables = block_tables.tolist()
        if len({tuple(t) for t in tables}) != b:
            raise ContractError(f"two decode rows share a block table: {tables}")
        for row in range(b):
            self.kv.write(tables[row], positions[row], int(input_ids[row, 0]))
        logits = [self.reference.next_logits(self.kv.read(tables[r], positions[r])) for r in range(b)]
        return RBLNDecoderOnlyOutput(logits=torch.stack(logits).to(dtype).unsqueeze(1))


def _check_tensor(name: str, t, dtype) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        raise ContractError(f"{name} must be a {dtype} tensor (compiled input type), got {t!r}")


def _safetensors_names(path: Path) -> list[str]:
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return [k for k in json.loads(f.read(size)) if k != "__metadata__"]


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def install(monkeypatch) -> types.ModuleType:
    """Put a fresh ``optimum.rbln`` stand-in (with its own recorder) into sys.modules for one test."""
    module = types.ModuleType("optimum.rbln")
    module.__version__ = VERSION
    recorder = Recorder()
    module.recorder = recorder
    for arch in ARCHITECTURES:
        name = f"RBLN{arch}"
        setattr(module, name, type(name, (RBLNDecoderOnlyModelForCausalLM,),
                                   {"recorder": recorder, "hf_architecture": arch}))
    parent = types.ModuleType("optimum")
    parent.__path__ = []
    parent.rbln = module
    monkeypatch.setitem(sys.modules, "optimum", parent)
    monkeypatch.setitem(sys.modules, "optimum.rbln", module)
    return module
