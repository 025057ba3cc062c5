"""4-bit group-wise linears in AWQ's format: the ``awq`` (pre-quantized) and ``int4`` methods.

Loading an AutoAWQ checkpoint: :meth:`AwqHandler.convert_weights` dequantizes
each ``qweight``/``qzeros``/``scales`` triple into the float ``weight`` the
model's loader expects (so fused q/k/v and gate/up slices land as usual) and
keeps the packed tensors; as soon as a decoder layer is loaded,
:meth:`AwqHandler.quantize_linears` replaces each of its fused layers with an
:class:`Int4Linear` built from the exact packed values, concatenated along the
output dimension (so one layer at a time is dequantized, not the whole model).

Kernels: on the CPU, ``torch._weight_int4pack_mm_for_cpu`` (computes
``(q - 8) * scale + offset``, so AWQ's ``(q - zero) * scale`` maps exactly to
``offset = (8 - zero) * scale``); on CUDA, our Triton kernel reading AWQ's
packed nibbles (zero points pre-multiplied into a float offset). A shape
neither handles keeps the dequantized float layer.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from llmcore.errors import ConfigError, ModelLoadError
from llmcore.models.llama import STACKED_PROJECTIONS
from llmcore.quantization.awq_format import (
    dequantize_awq, pack_awq, pick_group_size, quantize_groups_minmax, unpack_awq,
)
from llmcore.quantization.handler import QuantHandler, checkpoint_format, checkpoint_quant_config
from llmcore.quantization.int8 import quantize_output_int8

log = logging.getLogger("llmcore.quantization")

AWQ_SUFFIXES = (".qweight", ".qzeros", ".scales")
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
INT4_GROUP_SIZE = 32


@functools.lru_cache(maxsize=None)
def int4pack_available() -> bool:
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 1)
        torch._weight_int4pack_mm_for_cpu(torch.ones(1, 64), packed, 32, torch.ones(2, 16, 2))
        return True
    except Exception:  # older torch or a build without the CPU int4 kernel
        return False


def pick_kernel(device: torch.device, out_features: int, in_features: int, group_size: int) -> str | None:
    """The kernel for this shape on ``device``, or None (keep a float layer)."""
    if in_features % group_size or out_features % 8:
        return None
    if device.type == "cpu":
        ok = out_features % 16 == 0 and group_size in INT4PACK_GROUP_SIZES and int4pack_available()
        return "int4pack" if ok else None
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return None


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights ``W[n, k] = q[n, k] * scale[k // g, n] + offset[k // g, n]``.

    The float offset covers both AWQ's integer zero points (``offset = -zero *
    scale``) and min/max quantization (``offset = min``). Each kernel gets the
    layout it reads: torch's CPU int4pack (``(q - 8) * scale + (offset + 8 *
    scale)``), or AWQ-packed nibbles for the Triton kernel.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, kernel: str) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.kernel = kernel
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        s, o = scales.float(), offsets.float()
        if kernel == "int4pack":
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1))
            self.register_buffer("scales_and_zeros", torch.stack([s, o + 8 * s], -1).to(dtype).contiguous())
        elif kernel == "triton":
            self.register_buffer("qweight", pack_awq(q.t()))
            self.register_buffer("scales", s.to(dtype).contiguous())
            self.register_buffer("offsets", o.to(dtype).contiguous())
        else:
            raise ValueError(f"unknown int4 kernel {kernel!r}")

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, kernel: str) -> "Int4Linear":
        q = unpack_awq(qweight).t()
        s = scales.float()
        return cls(q, s, -unpack_awq(qzeros).float() * s, group_size, bias, dtype, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "int4pack":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            from llmcore.quantization.triton.int4_mm import int4_mm

            y = int4_mm(x2, self.qweight, self.scales, self.offsets, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
                f"kernel={self.kernel}")


# ----------------------------------------------------------------- awq (pre-quantized)


def _stacked_target(name: str) -> tuple[str, int | None]:
    """Our module name and shard index for an HF layer name (q/k/v and gate/up are fused)."""
    for hf, (ours, idx) in STACKED_PROJECTIONS.items():
        if name.endswith(f".{hf}"):
            return name[: -len(hf)] + ours, idx
    return name, None


class AwqHandler(QuantHandler):
    """``awq``: load an AutoAWQ GEMM checkpoint; 4-bit kernels where the shape allows."""

    def __init__(self, method, device, dtype, **options) -> None:
        super().__init__(method, device, dtype, **options)
        self.group_size = 0
        self.packed: dict[str, dict[str, torch.Tensor]] = {}

    def check_checkpoint(self, folder: Path) -> None:
        fmt = checkpoint_format(folder)
        if fmt != "awq":
            raise ConfigError(
                "quantization", "awq",
                f"needs an AWQ checkpoint, but {folder} is " + (f"quantized with {fmt}" if fmt else "not quantized")
                + " (config.json has no quantization_config.quant_method 'awq')",
                "Make one with: llmcore quantize --method awq --model DIR --calibration FILE --output DIR"
                + ("; or use a quantize-at-load method: eetq, int4, bnb-int8, bnb-nf4" if not fmt else ""),
            )
        cfg = checkpoint_quant_config(folder) or {}
        bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
        version = str(cfg.get("version", "gemm")).lower()
        zero_point = cfg.get("zero_point", True)
        group = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        problems = []
        if bits != 4:
            problems.append(f"bits={bits} (only 4 is supported)")
        if version != "gemm":
            problems.append(f"version={version!r} (only the GEMM layout is supported)")
        if not zero_point:
            problems.append("zero_point=false (only zero-point AWQ is supported)")
        if group <= 0:
            problems.append(f"group_size={group} (per-channel checkpoints are not supported)")
        if problems:
            raise ConfigError("quantization", "awq", f"{folder}: unsupported AWQ checkpoint: {'; '.join(problems)}",
                              "Re-export it in AutoAWQ's GEMM layout, 4-bit, with zero points and a group size")
        self.group_size = group

    def convert_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            suffix = next((s for s in AWQ_SUFFIXES if name.endswith(s)), None)
            if suffix is None:
                yield name, tensor
                continue
            prefix = name[: -len(suffix)]
            parts = pending.setdefault(prefix, {})
            parts[suffix[1:]] = tensor
            if len(parts) == 3:
                del pending[prefix]
                self._check_shapes(prefix, parts)
                self.packed[prefix] = parts
                w = dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"], self.group_size)
                yield f"{prefix}.weight", w.to(self.torch_dtype)
        if pending:
            prefix, parts = next(iter(pending.items()))
            raise ModelLoadError(f"AWQ checkpoint: {prefix} has {', '.join(sorted(parts))} but not all of "
                                 "qweight, qzeros, scales")

    def _check_shapes(self, prefix: str, parts: dict[str, torch.Tensor]) -> None:
        qw, qz, sc = parts["qweight"], parts["qzeros"], parts["scales"]
        k, n8 = qw.shape
        g = self.group_size
        want = {"qweight": (k, n8), "qzeros": (k // g, n8), "scales": (k // g, n8 * 8)}
        got = {"qweight": tuple(qw.shape), "qzeros": tuple(qz.shape), "scales": tuple(sc.shape)}
        if k % g or got != want or qw.dtype != torch.int32 or qz.dtype != torch.int32:
            raise ModelLoadError(
                f"AWQ checkpoint: {prefix} is not in the GEMM layout with group_size {g}: shapes "
                f"{got} (dtypes {qw.dtype}, {qz.dtype}), expected {want} with int32 qweight/qzeros"
            )

    streaming = True

    def quantize_linears(self, model: nn.Module, module: nn.Module, prefix: str = "") -> None:
        """Swap the fused layers under ``prefix`` (all of them for ``""``) whose packed tensors
        have arrived; each layer's dequantized float weight is freed as soon as it is swapped."""
        groups: dict[str, list[tuple[int | None, str]]] = {}
        for packed_prefix in self.packed:
            target, shard = _stacked_target(packed_prefix)
            if prefix and target != prefix and not target.startswith(prefix + "."):
                continue
            groups.setdefault(target, []).append((shard, packed_prefix))
        for target, shards in groups.items():
            try:
                layer = model.get_submodule(target)
            except AttributeError:
                layer = None
            if not isinstance(layer, nn.Linear):
                raise ModelLoadError(f"AWQ checkpoint: {shards[0][1]} has no linear layer {target} to go to")
            shards.sort(key=lambda s: -1 if s[0] is None else s[0])
            parts = [self.packed[p] for _, p in shards]
            cat = {key: torch.cat([p[key] for p in parts], dim=1) for key in ("qweight", "qzeros", "scales")}
            n, k = layer.weight.shape
            if cat["scales"].shape[1] != n or cat["qweight"].shape[0] != k:
                raise ModelLoadError(f"AWQ checkpoint: {target} is missing a shard (found {[p for _, p in shards]})")
            for _, p in shards:
                del self.packed[p]
            kernel = pick_kernel(layer.weight.device, n, k, self.group_size)
            if kernel is None:
                self.kept.append((n, k))  # the dequantized float weight is already in place
                continue
            parent_name, _, attr = target.rpartition(".")
            dev = layer.weight.device
            new = Int4Linear.from_awq(cat["qweight"].to(dev), cat["qzeros"].to(dev), cat["scales"].to(dev),
                                      self.group_size, layer.bias, self.torch_dtype, kernel)
            setattr(model.get_submodule(parent_name), attr, new)
            self.swapped += 1

    def finish(self, model: nn.Module) -> None:
        if self.packed:  # a layer outside the parts the runner reported (none for Llama-family models)
            self.quantize_linears(model, model)
        super().finish(model)

    def log_summary(self, model: nn.Module) -> None:
        log.info("awq: %d layers on 4-bit kernels, %d kept dequantized (shape unsupported by the kernel)",
                 self.swapped, len(self.kept))
        if not self.swapped and self.kept:
            log.warning("awq: no layer could use a 4-bit kernel on %s; running the dequantized weights",
                        self.device)


def load_awq(method, device: str, dtype: str, **options) -> AwqHandler:
    return AwqHandler(method, device, dtype, **options)


# ----------------------------------------------------------------- int4 (at load)


def int4_linear_from_float(layer: nn.Linear, group_size: int, dtype: torch.dtype) -> Int4Linear | None:
    return int4_from_weight(layer.weight, layer.bias, group_size, dtype)


def int4_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                     dtype: torch.dtype) -> Int4Linear | None:
    """Min/max 4-bit groups for ``weight``, or None where no kernel takes the shape."""
    n, k = weight.shape
    g = pick_group_size(k, group_size)
    kernel = None if g is None else pick_kernel(weight.device, n, k, g)
    if kernel is None:
        return None
    q, scales, mins = quantize_groups_minmax(weight, g, dtype)
    return Int4Linear(q, scales.t(), mins.t(), g, bias, dtype, kernel)


class Int4Handler(QuantHandler):
    """``int4``: min/max 4-bit groups of 32 at load (no calibration), int8 output projection.

    Groups of 32 with a float offset are llama.cpp's Q4_1 block: 5 bits per
    weight with the scales, and the embedded SmolLM2 (which ships as Q4_1)
    loses nothing to it. Quantizes one layer at a time while loading
    (``streaming``).
    """

    streaming = True

    def quantize_linear(self, layer: nn.Linear) -> Int4Linear | None:
        return int4_linear_from_float(layer, int(self.options.get("group_size", INT4_GROUP_SIZE)), self.torch_dtype)

    def quantize_output(self, model: nn.Module) -> None:
        # int8, not 4-bit: the embedded SmolLM2's output table is not Q4_1, and 4-bit groups of
        # 32 there cost +6.5% perplexity for ~1 ms a token (docs/quantization.md)
        quantize_output_int8(model, self.torch_dtype)

    def log_summary(self, model: nn.Module) -> None:
        log.info("int4: %d layers to 4-bit, output projection int8%s", self.swapped,
                 f"; kept float (shape unsupported): {self.kept}" if self.kept else "")


def load_int4(method, device: str, dtype: str, **options) -> Int4Handler:
    return Int4Handler(method, device, dtype, **options)

