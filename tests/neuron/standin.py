"""A stand-in for ``optimum.neuron`` 0.4.5, shaped like its inference API, for contract tests.

It is injected with ``monkeypatch.setitem(sys.modules, ...)`` for one test and
never installed. It keeps the signatures of the real entry points
(``NeuronModelForCausalLM.get_neuron_config``, ``.export``,
``.from_pretrained``, ``.save_pretrained`` and the NxD ``forward``), records
every call with its arguments bound to those signatures, and applies the
rules the real SDK applies (static shapes, dtypes of the inputs, which graph a
call selects, how a short decode batch is padded), so a plugin change that
would break on hardware fails here.

The compiled model is emulated with Hugging Face transformers on the CPU: the
KV cache of each ``seq_id`` is kept as the token ids written at each
position, and logits are those of the model on exactly those tokens. A
runner that writes the wrong slot or position therefore gets wrong logits.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import torch

VERSION = "0.4.5"
SUPPORTED_INSTANCE_TYPES = {"trn1": "trn1", "inf2": "trn1", "trn1n": "trn1", "trn2": "trn2"}
SUPPORTED_MODEL_TYPES = ("granite", "llama", "llama4_text", "mixtral", "phi3", "qwen2", "qwen3",
                         "qwen3_moe", "smollm3")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD = "checkpoint/weights/tp{rank}_sharded_checkpoint.safetensors"


class ContractError(AssertionError):
    """The plugin called the stand-in in a way the real SDK would not accept."""


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def record(self, fn, name: str, *args, **kwargs) -> dict[str, Any]:
        bound = inspect.signature(fn).bind(*args, **kwargs)  # TypeError on a kwarg the SDK lacks
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


class NxDNeuronConfig:
    """Same attributes, defaults and JSON form as optimum-neuron's NxDNeuronConfig."""

    def __init__(self, checkpoint_id=None, checkpoint_revision=None, batch_size=1, max_batch_size=None,
                 continuous_batching=False, speculation_length=0, sequence_length=128, tp_degree=1,
                 ep_degree=1, pp_degree=1, torch_dtype=torch.bfloat16, n_active_tokens=None,
                 max_context_length=None, output_logits=False, fused_qkv=False, target=None,
                 on_device_sampling=False, max_topk=256, start_rank_id=0, local_ranks_size=None,
                 capacity_factor=None, glu_mlp=True):
        self.checkpoint_id = checkpoint_id
        self.checkpoint_revision = checkpoint_revision
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.tp_degree = tp_degree
        self.torch_dtype = DTYPES[torch_dtype] if isinstance(torch_dtype, str) else torch_dtype
        self.n_active_tokens = sequence_length if n_active_tokens is None else n_active_tokens
        self.output_logits = output_logits
        self.max_context_length = sequence_length if max_context_length is None else max_context_length
        self.fused_qkv = fused_qkv
        self.continuous_batching = continuous_batching
        self.max_batch_size = batch_size if max_batch_size is None else max_batch_size
        self.on_device_sampling = on_device_sampling
        self.max_topk = max_topk
        self.speculation_length = speculation_length
        self.pp_degree = pp_degree
        self.ep_degree = ep_degree
        self.start_rank_id = start_rank_id
        self.local_ranks_size = tp_degree * pp_degree * ep_degree if local_ranks_size is None else local_ranks_size
        self.target = target
        self.capacity_factor = capacity_factor
        self.glu_mlp = glu_mlp

    @property
    def ctx_batch_size(self) -> int:
        return 1 if self.continuous_batching else self.batch_size

    def to_dict(self) -> dict[str, Any]:
        out = {k: (str(v).split(".")[1] if isinstance(v, torch.dtype) else v) for k, v in vars(self).items()}
        out.update(_serialized_key="NxDNeuronConfig", optimum_neuron_version=VERSION,
                   neuronxcc_version="2.21.33363.0+standin")
        return out

    def save_pretrained(self, save_directory) -> None:
        Path(save_directory, "neuron_config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path) -> "NxDNeuronConfig":
        d = json.loads(Path(path, "neuron_config.json").read_text())
        if d.pop("_serialized_key", None) != "NxDNeuronConfig":
            raise ContractError("neuron_config.json is not an NxDNeuronConfig")
        d.pop("optimum_neuron_version", None)
        d.pop("neuronxcc_version", None)
        return cls(**d)


class NeuronModelForCausalLM:
    """The inference auto class; class methods keep optimum-neuron 0.4.5's signatures."""

    recorder: Recorder  # set per injected module

    @classmethod
    def get_neuron_config(cls, model_name_or_path, config=None, token=None, revision=None, instance_type=None,
                          batch_size=None, sequence_length=None, tensor_parallel_size=None):
        cls.recorder.record(cls.get_neuron_config.__func__, "get_neuron_config", cls, model_name_or_path,
                            config=config, token=token, revision=revision, instance_type=instance_type,
                            batch_size=batch_size, sequence_length=sequence_length,
                            tensor_parallel_size=tensor_parallel_size)
        if not Path(model_name_or_path).is_dir():
            raise ContractError(f"{model_name_or_path}: a hub id would be downloaded; llmcore passes local folders")
        if config is None:
            raise ContractError("config=None: the SDK would reload it and lose the export dtype")
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {config.model_type} is not supported for text-generation")
        if instance_type not in SUPPORTED_INSTANCE_TYPES:
            raise ValueError(f"{instance_type} is not a valid instance type")
        dtype = config.dtype
        if not isinstance(dtype, torch.dtype):
            if dtype not in DTYPES:  # the SDK's DTYPE_MAPPER.pt raises the same way
                raise ValueError(f"Unable to find `{dtype}` in the dtype mapping")
            dtype = DTYPES[dtype]
        batch_size = batch_size or 1
        if sequence_length is None or tensor_parallel_size is None:
            raise ContractError("sequence_length / tensor_parallel_size left to the SDK's defaults "
                                "(model max length / every core of this host)")
        # what LlamaNxDModelForCausalLM._get_neuron_config builds
        return NxDNeuronConfig(
            checkpoint_id=None, checkpoint_revision=None, batch_size=batch_size,
            sequence_length=sequence_length, tp_degree=tensor_parallel_size, torch_dtype=dtype,
            target=SUPPORTED_INSTANCE_TYPES[instance_type], on_device_sampling=True, fused_qkv=True,
            continuous_batching=batch_size > 1,
        )

    @classmethod
    def export(cls, model_id, neuron_config, config=None, token=None, revision=None, load_weights=False,
               **kwargs):
        cls.recorder.record(cls.export.__func__, "export", cls, model_id, neuron_config, config=config,
                            token=token, revision=revision, load_weights=load_weights, **kwargs)
        if kwargs:
            raise ContractError(f"export() ignores {sorted(kwargs)} (logged as unsupported by neuron)")
        if not isinstance(neuron_config, NxDNeuronConfig):
            raise ContractError(f"neuron_config is a {type(neuron_config).__name__}, not NxDNeuronConfig")
        if config is not None:
            config.dtype = neuron_config.torch_dtype  # the SDK sets config.torch_dtype the same way
        model = StandinNxDModel(config, neuron_config, weights_dir=Path(model_id), recorder=cls.recorder)
        if load_weights:
            model.load()
        return model

    @classmethod
    def from_pretrained(cls, model_id, **kwargs):
        cls.recorder.record(cls.from_pretrained.__func__, "from_pretrained", cls, model_id, **kwargs)
        path = Path(model_id)
        if kwargs:
            raise ContractError(f"from_pretrained() ignores {sorted(kwargs)}")
        neuron_config = NxDNeuronConfig.from_pretrained(path)
        for name in ("config.json", "model.pt", SHARD.format(rank=0)):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: not a saved Neuron model")
        from transformers import AutoConfig

        model = StandinNxDModel(AutoConfig.from_pretrained(str(path)), neuron_config, weights_dir=path,
                                recorder=cls.recorder)
        model.load()
        return model


class StandinNxDModel:
    """What NxDModelForCausalLM does at its public surface: save, and forward over the two graphs."""

    def __init__(self, config, neuron_config: NxDNeuronConfig, weights_dir: Path, recorder: Recorder) -> None:
        self.config = config
        self.neuron_config = neuron_config
        self.weights_dir = weights_dir
        self.recorder = recorder
        self.reference = None
        self.kv: dict[int, list[int]] = {}  # seq_id -> token id written at each position

    def load(self) -> None:
        from llmcore.testing.reference import HFReference

        shard = self.weights_dir / SHARD.format(rank=0)
        if shard.is_file():
            self.reference = HFReference.from_files(self.weights_dir, shard)
        else:
            self.reference = HFReference.from_pretrained(self.weights_dir)

    def save_pretrained(self, save_directory, **kwargs):
        self.recorder.record(StandinNxDModel.save_pretrained, "save_pretrained", self, save_directory, **kwargs)
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.neuron_config.save_pretrained(out)
        self.config.save_pretrained(out)
        (out / "model.pt").write_bytes(b"stand-in for the traced NxD graphs (torch.jit)")
        # the SDK shards the checkpoint per rank when exporting from a local folder
        weights = sorted(self.weights_dir.glob("*.safetensors"))
        if len(weights) != 1:
            raise ContractError(f"stand-in expects one safetensors file in {self.weights_dir}")
        for rank in range(self.neuron_config.tp_degree):
            dst = out / SHARD.format(rank=rank)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights[0], dst)

    def forward(self, input_ids, position_ids, seq_ids=None, sampling_params=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        self.recorder.record(StandinNxDModel.forward, "forward", self, input_ids, position_ids,
                             seq_ids=seq_ids, sampling_params=sampling_params,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=return_dict)
        nc = self.neuron_config
        if self.reference is None:
            raise ContractError("forward() on a model exported with load_weights=False")
        for name, t in (("input_ids", input_ids), ("position_ids", position_ids), ("seq_ids", seq_ids)):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
                raise ContractError(f"{name} must be an integer tensor, got {t!r}")
        if input_ids.dim() != 2 or position_ids.shape != input_ids.shape:
            raise ContractError(f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} "
                                "must both be [batch, tokens]")
        if seq_ids.shape != (input_ids.shape[0],):
            raise ContractError(f"seq_ids {tuple(seq_ids.shape)} must be [batch]")
        if sampling_params is None or tuple(sampling_params.shape) != (input_ids.shape[0], 3):
            raise ContractError("sampling_params must be a [batch, 3] tensor (top_k, top_p, temperature)")
        if input_ids.shape[-1] > 1 and not position_ids.min().item():
            out = self._context_encoding(input_ids, position_ids, seq_ids)
        elif input_ids.shape[-1] != 1:
            raise ContractError(f"{input_ids.shape[-1]} tokens not starting at position 0: neither graph "
                                "accepts that (no speculation compiled)")
        else:
            out = self._token_generation(input_ids, position_ids, seq_ids)
        return self._sample(out[:, -1, :], sampling_params) if nc.on_device_sampling else out

    def _sample(self, logits: torch.Tensor, sampling_params: torch.Tensor) -> torch.Tensor:
        """On-device sampling: one token per row from [top_k, top_p, temperature] (top_k 1: greedy)."""
        tokens = []
        for row, (top_k, top_p, temperature) in zip(logits, sampling_params.tolist()):
            if not 1 <= top_k <= self.neuron_config.max_topk:
                raise ContractError(f"top_k {top_k} outside 1..max_topk {self.neuron_config.max_topk}")
            if top_k == 1:
                tokens.append(int(row.argmax()))
                continue
            values, indices = row.float().topk(int(top_k))
            probs = torch.softmax(values / temperature, dim=-1)
            tokens.append(int(indices[torch.multinomial(probs, 1)]))
        return torch.tensor(tokens, dtype=torch.int64)  # [batch]

    __call__ = forward

    def _logits(self, seq: int) -> torch.Tensor:
        tokens = self.kv[seq]
        if None in tokens:
            raise ContractError(f"seq_id {seq} attends to KV position {tokens.index(None)}, never written "
                                "or overwritten by padding: the output would be garbage")
        return self.reference.next_logits(tokens)

    def _context_encoding(self, input_ids, position_ids, seq_ids) -> torch.Tensor:
        nc = self.neuron_config
        b, n = input_ids.shape
        if b > nc.ctx_batch_size:
            raise ContractError(f"context encoding was compiled for batch {nc.ctx_batch_size}, got {b}")
        if n > nc.max_context_length:
            raise ContractError(f"prompt of {n} tokens exceeds max_context_length {nc.max_context_length}")
        out = []
        for row in range(b):
            seq = int(seq_ids[row])
            if not 0 <= seq < nc.max_batch_size:
                raise ContractError(f"seq_id {seq} outside 0..{nc.max_batch_size - 1}")
            pos = position_ids[row].tolist()
            if pos != list(range(n)):
                raise ContractError(f"positions {pos}: prompts are passed unpadded from position 0 "
                                    "(the SDK right-pads to the compiled length itself)")
            self.kv[seq] = input_ids[row].tolist()
            out.append(self._logits(seq))
        return torch.stack(out).unsqueeze(1)  # [batch, 1, vocab]

    def _token_generation(self, input_ids, position_ids, seq_ids) -> torch.Tensor:
        nc = self.neuron_config
        b = input_ids.shape[0]
        if b > nc.max_batch_size:
            raise ValueError(f"Input batch size {b} exceeds the maximum batch size {nc.max_batch_size}.")
        rows = list(zip(input_ids[:, 0].tolist(), position_ids[:, 0].tolist(), seq_ids.tolist()))
        if len({s for _, _, s in rows}) != b:
            raise ContractError(f"duplicate seq_ids {seq_ids.tolist()}")
        if b < nc.batch_size:
            # the SDK pads to the compiled batch with copies of row 0 written to the unused seq_ids
            used = {s for _, _, s in rows}
            pad = [s for s in range(nc.max_batch_size) if s not in used][: nc.batch_size - b]
            rows += [(rows[0][0], rows[0][1], s) for s in pad]
        out = []
        for r, (token, pos, seq) in enumerate(rows):
            if pos >= nc.sequence_length:
                raise ContractError(f"position {pos} is beyond sequence_length {nc.sequence_length}")
            hist = self.kv.get(seq, [])
            # positions never written hold garbage (None); a padded row may create such gaps
            self.kv[seq] = hist[:pos] + [None] * (pos - len(hist)) + [token]
            if r < b:
                out.append(self._logits(seq))
        return torch.stack(out).unsqueeze(1)  # [batch, 1, vocab]


def install(monkeypatch) -> types.ModuleType:
    """Put a fresh ``optimum.neuron`` stand-in (with its own recorder) into sys.modules for one test."""
    module = types.ModuleType("optimum.neuron")
    module.__version__ = VERSION
    recorder = Recorder()
    auto = type("NeuronModelForCausalLM", (NeuronModelForCausalLM,), {"recorder": recorder})
    module.NeuronModelForCausalLM = auto
    module.NxDNeuronConfig = NxDNeuronConfig
    module.recorder = recorder
    parent = types.ModuleType("optimum")
    parent.__path__ = []
    parent.neuron = module
    monkeypatch.setitem(sys.modules, "optimum", parent)
    monkeypatch.setitem(sys.modules, "optimum.neuron", module)
    return module
