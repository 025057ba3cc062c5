"""int8 per-channel weight-only linears (W8A16): the ``eetq`` method and int4's output projection.

Weights are symmetric int8 per output channel (scale = max|w| / 127), no
calibration; activations stay in the model dtype. Kernels, by device:

* cpu: ``torch._weight_int8pack_mm`` for bf16/fp16 activations (one read of the int8 weight per
  product; single-stream decode is bound by weight reads, so half the bytes of bf16). For float32
  activations torch runs that op as a scalar loop (~1 ms per row for a 1536 x 576 weight on an
  AVX2 EPYC: a 1,000-token prompt took 112 s), so float32 dequantizes the weight in row chunks
  and calls the float32 GEMM (1000 rows: 15 ms instead of 1,023);
* cuda: the ``eetq`` package's ``w8_a16_gemm`` when installed, else our Triton
  kernel (:mod:`llmcore.quantization.triton.int8_mm`);
* anything else: dequantize per call (correct, not fast).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.quantization.handler import QuantHandler, output_weight, set_output

log = logging.getLogger("llmcore.quantization")


# elements quantized at a time: every step is per row (or per element), so row chunks give the
# same bits as one pass, while a large table's float32 temporaries (SmolLM2's output projection:
# 113 MB each, several alive at once) stay at a few MB during a load
_CHUNK_ELEMENTS = 1 << 20


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [N, K], float32 scale [N])`` with ``weight ~= q * scale[:, None]``."""
    w = weight.detach()
    n, k = w.shape
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    for start in range(0, n, rows):
        wc = w[start : start + rows].to(torch.float32, copy=True)  # a copy: divided in place below
        sc = wc.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[start : start + rows].copy_(wc.div_(sc[:, None]).round_().clamp_(-127, 127))
        scale[start : start + rows] = sc
    return q, scale


@functools.lru_cache(maxsize=None)
def int8pack_available() -> bool:
    try:
        x = torch.ones(1, 32)
        torch._weight_int8pack_mm(x, torch.ones(16, 32, dtype=torch.int8), torch.ones(16))
        return True
    except Exception:  # older torch, or an op missing from this build
        return False


def _eetq_ops():
    """``(quant_weights, w8_a16_gemm)`` from the eetq package, or None (module name differs by release)."""
    for name in ("eetq", "EETQ"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            mod = importlib.import_module(name)
            return mod.quant_weights, mod.w8_a16_gemm
        except (ImportError, AttributeError) as exc:
            log.info("eetq package found but unusable (%s); using llmcore's int8 kernels", exc)
    return None


def pick_kernel(device: torch.device) -> str:
    if device.type == "cpu":
        return "int8pack" if int8pack_available() else "dequant"
    if device.type == "cuda":
        if _eetq_ops() is not None:
            return "eetq"
        if importlib.util.find_spec("triton") is not None:
            return "triton"
    return "dequant"


# weight rows dequantized at a time by _dequant_linear: bounds the float temporary (SmolLM2's
# 49,152-row output projection would be 113 MB at once in float32)
DEQUANT_ROWS = 8192


def _dequant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale)^T`` through the dense GEMM of x's dtype, the weight widened in row chunks."""
    n = q.shape[0]
    if n <= DEQUANT_ROWS:
        return F.linear(x, q.to(x.dtype)) * scale
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, DEQUANT_ROWS):
        end = min(start + DEQUANT_ROWS, n)
        torch.mul(F.linear(x, q[start:end].to(x.dtype)), scale[start:end], out=y[:, start:end])
    return y


class Int8Linear(nn.Module):
    """``y = x @ (q * scale)^T + bias`` with q int8 per output channel."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, kernel: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.kernel = kernel or pick_kernel(qweight.device)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        if self.kernel == "eetq":
            quant_weights, _ = _eetq_ops()
            # eetq quantizes a float16 [K, N] weight itself (its own layout and scales)
            w16 = (qweight.float() * scale[:, None]).to(torch.float16).t().contiguous().cpu()
            w, s = quant_weights(w16, torch.int8, False)
            self.register_buffer("weight", w.to(qweight.device))
            self.register_buffer("scale", s.to(qweight.device))
        else:
            self.register_buffer("weight", qweight.contiguous())
            # int8pack_mm wants the scales in the activation dtype
            self.register_buffer("scale", scale.to(dtype).contiguous())

    @classmethod
    def from_linear(cls, layer: nn.Linear, dtype: torch.dtype, kernel: str | None = None) -> "Int8Linear":
        q, s = quantize_int8(layer.weight)
        return cls(q, s, layer.bias, dtype, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "int8pack" and x2.dtype != torch.float32:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        elif self.kernel == "int8pack":
            y = _dequant_linear(x2, self.weight, self.scale)
        elif self.kernel == "triton":
            from llmcore.quantization.triton.int8_mm import int8_weight_only_mm

            y = int8_weight_only_mm(x2, self.weight, self.scale)
        elif self.kernel == "eetq":
            _, w8_a16_gemm = _eetq_ops()
            y = w8_a16_gemm(x2, self.weight, self.scale)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """Token embedding from an int8 table with one scale per token."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        # plain attributes: the table is usually the int8 output projection's, stored once
        self.weight = qweight
        self.scale = scale
        self.dtype = dtype

    @classmethod
    def shared_with(cls, output: Int8Linear, dtype: torch.dtype) -> "Int8Embedding":
        return cls(output.weight, output.scale, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].to(self.dtype) * self.scale[ids].unsqueeze(-1)).to(self.dtype)


def quantize_output_int8(model: nn.Module, dtype: torch.dtype, share_embedding: bool = True) -> None:
    """int8 output projection; a tied embedding then reads the same int8 table."""
    weight, tied = output_weight(model)
    bias = None if tied else getattr(model.lm_head, "bias", None)
    q, s = quantize_int8(weight)
    out = Int8Linear(q, s, bias, dtype)
    if out.kernel == "eetq":
        share_embedding = False  # eetq's layout is not row-addressable
    set_output(model, out)
    if tied and share_embedding:
        model.model.embed_tokens = Int8Embedding.shared_with(out, dtype)


class EetqHandler(QuantHandler):
    """``eetq``: every linear and the output projection to int8 per channel (one layer at a time
    while loading: :class:`~llmcore.quantization.handler.QuantHandler` ``streaming``)."""

    streaming = True

    def quantize_linear(self, layer: nn.Linear) -> Int8Linear:
        return Int8Linear.from_linear(layer, self.torch_dtype)

    def quantize_output(self, model: nn.Module) -> None:
        quantize_output_int8(model, self.torch_dtype, self.options.get("share_embedding", True))

    def log_summary(self, model: nn.Module) -> None:
        kernels = {m.kernel for m in model.modules() if isinstance(m, Int8Linear)}
        log.info("eetq: %d linear layers + output projection to int8 (kernel %s)", self.swapped,
                 ", ".join(sorted(kernels)))


def load_eetq(method, device: str, dtype: str, **options) -> EetqHandler:
    return EetqHandler(method, device, dtype, **options)
