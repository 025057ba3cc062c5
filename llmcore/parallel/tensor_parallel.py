"""Tensor parallelism (Megatron style) for the Llama-family model, which stays single-device code.

Rank ``r`` of ``N`` keeps:

* ``qkv_proj`` (fused ``[q | k | v]`` rows): column-parallel, sliced by heads *separately* for
  q, k and v (query heads ``r*H/N ..``, KV heads ``r*KV/N ..``; the GQA grouping stays local)
  and re-concatenated; its bias the same way;
* ``o_proj``: row-parallel (the input columns of its local heads), followed by an all-reduce
  of its output; its bias is kept on rank 0 only, so the sum adds it once;
* ``gate_up_proj`` (fused ``[gate | up]``): column-parallel, gate and up sliced separately;
* ``down_proj``: row-parallel + all-reduce, bias on rank 0 only;
* embeddings, norms, ``lm_head``: replicated (every rank computes the same logits).

Attention modules get the local ``num_heads`` / ``num_kv_heads`` / ``q_size`` / ``kv_size``, the
MLP the local ``intermediate``; the model's ``config`` becomes the local one (the runner sizes
the KV cache from it: each rank caches its own KV heads). Two all-reduces per layer.

Two ways to get a rank's model, with identical results (tests/parallel checks it):

* :func:`apply_tensor_parallel`: the transform on a built, fully loaded model;
* the runner's loading hook (:class:`TPGroup` ``local_config`` / ``shard_weights`` /
  ``finish``): the model is built with the local shapes and each checkpoint tensor is sliced
  as it is read, so a device never holds more than its shard. The executor passes each rank's
  group to ``Device.create_runner(..., tp=group)``, which hands it to ``TorchModelRunner``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from llmcore.models.config import ModelConfig
from llmcore.parallel.validate import check_divides, tensor_parallel_sizes, validate_tensor_parallel

__all__ = [
    "TPGroup", "RowParallelLinear", "apply_tensor_parallel", "local_config", "shard_checkpoint", "tensor_parallel_sizes", "validate_tensor_parallel",
    "wrap_row_parallel",
]


@dataclasses.dataclass(eq=False)
class TPGroup:
    """This process's place in a tensor-parallel group, and its all-reduce."""

    rank: int
    world_size: int
    group: Any = None  # a torch.distributed process group; None = the default group
    # replaces the all-reduce (unit tests: run every rank's shard in one process)
    reduce_fn: Callable[[torch.Tensor], Any] | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns ``t``."""
        if self.reduce_fn is not None:
            self.reduce_fn(t)
        else:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t

    # -- the runner's loading hook (llmcore.runtime.runner.TorchModelRunner._load)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        return local_config(cfg, self.world_size)

    def shard_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return shard_checkpoint(weights, self.rank, self.world_size)

    def finish(self, model: nn.Module) -> None:
        wrap_row_parallel(model, self)


def local_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """The shapes one rank of ``n`` holds (head_dim, hidden size and vocab unchanged)."""
    if n == 1:
        return cfg
    check_divides(n, cfg)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // n, num_kv_heads=cfg.num_kv_heads // n,
                               intermediate_size=cfg.intermediate_size // n)


# Hugging Face checkpoint names: output rows split (column-parallel) or input columns split
# (row-parallel; the bias stays whole and is added on rank 0 after loading)
_SHARDED = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj|o_proj|down_proj)\.(weight|bias)$")
_ROW_PARALLEL = ("o_proj", "down_proj")


def _slice(t: torch.Tensor, dim: int, rank: int, n: int) -> torch.Tensor:
    size = t.shape[dim] // n
    return t.narrow(dim, rank * size, size)


def shard_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], rank: int, n: int
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank ``rank``'s part of each checkpoint tensor (Hugging Face names), as it streams by.

    q/k/v and gate/up are separate tensors in a checkpoint, so slicing each one's rows by
    ``1/n`` is exactly slicing the fused parameter by heads (q, k, v) / by columns (gate, up).
    """
    for name, t in weights:
        m = _SHARDED.search(name)
        if m is None or n == 1:
            yield name, t
        elif m.group(1) in _ROW_PARALLEL:
            yield name, (_slice(t, 1, rank, n) if m.group(2) == "weight" else t)
        else:
            yield name, _slice(t, 0, rank, n)


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_local @ W_local.T) + b``: a row-parallel linear layer.

    Wraps the (sliced) ``nn.Linear`` so device code that reads ``.weight`` / ``.bias`` (the
    CUDA fused forward) sees this rank's weight and the bias only on rank 0; a device may
    still swap the inner ``linear`` (e.g. for a prepacked one) and keep the all-reduce.
    """

    def __init__(self, linear: nn.Module, tp: TPGroup) -> None:
        super().__init__()
        if tp.rank != 0 and getattr(linear, "bias", None) is not None:
            linear.bias = None  # the sum over ranks adds rank 0's bias once
        self.linear = linear
        self.tp = tp

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.linear(x))

    def extra_repr(self) -> str:
        return f"rank={self.tp.rank}, world_size={self.tp.world_size}"


def wrap_row_parallel(model: nn.Module, tp: TPGroup) -> nn.Module:
    """Put the all-reduce after every ``o_proj`` and ``down_proj`` (weights already sliced)."""
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        if not isinstance(a.o_proj, RowParallelLinear):
            a.o_proj = RowParallelLinear(a.o_proj, tp)
        if not isinstance(m.down_proj, RowParallelLinear):
            m.down_proj = RowParallelLinear(m.down_proj, tp)
    model.tp = tp  # device code (llmcore_cuda.model.FusedLlama) reads it
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous())
    return lin


def _rows(t: torch.Tensor | None, sizes: list[int], rank: int, n: int) -> torch.Tensor | None:
    """Slice each of the row blocks ``sizes`` of a fused tensor by ``1/n``; concatenate."""
    if t is None:
        return None
    parts, off = [], 0
    for s in sizes:
        parts.append(_slice(t.narrow(0, off, s), 0, rank, n))
        off += s
    return torch.cat(parts, 0)


@torch.no_grad()
def apply_tensor_parallel(model: nn.Module, tp: TPGroup) -> nn.Module:
    """Turn a built, loaded single-device model into rank ``tp.rank``'s shard, in place.

    Frees the full weights (each sliced parameter is a new tensor). Returns ``model``.
    """
    cfg: ModelConfig = model.config
    n, r = tp.world_size, tp.rank
    if n == 1:
        return model
    local = local_config(cfg, n)  # refuses sizes that do not divide the model
    d = cfg.head_dim
    q, kv, inter = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv_proj = _linear(_rows(a.qkv_proj.weight, [q, kv, kv], r, n), _rows(a.qkv_proj.bias, [q, kv, kv], r, n))
        a.o_proj = _linear(_slice(a.o_proj.weight, 1, r, n), a.o_proj.bias)
        a.num_heads, a.num_kv_heads = local.num_heads, local.num_kv_heads
        a.q_size, a.kv_size = local.num_heads * d, local.num_kv_heads * d
        m.gate_up_proj = _linear(_rows(m.gate_up_proj.weight, [inter, inter], r, n),
                                 _rows(m.gate_up_proj.bias, [inter, inter], r, n))
        m.down_proj = _linear(_slice(m.down_proj.weight, 1, r, n), m.down_proj.bias)
        m.intermediate = local.intermediate_size
    model.config = local
    return wrap_row_parallel(model, tp)
