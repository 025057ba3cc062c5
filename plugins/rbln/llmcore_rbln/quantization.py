"""RBLN's own quantization formats, as optimum-rbln 0.12 exposes them (``rbln_quantization``).

optimum-rbln does not quantize at compile time: it loads a checkpoint that
already holds the quantized weights and their scales (``weight_scale`` and
aliases) and compiles it. So a method is only accepted for a checkpoint whose
safetensors carry scales; that is checked from the file headers, without
loading any tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from llmcore.errors import ConfigError


@dataclass(frozen=True)
class RblnQuantMethod:
    name: str
    weights: str
    activations: str
    weight_bits: int

    def sdk_config(self) -> dict[str, str]:
        """The ``rbln_quantization`` dict (RBLNQuantizationConfig fields)."""
        return {"format": "rbln", "weights": self.weights, "activations": self.activations,
                "kv_caches": "fp16"}


METHODS = {
    m.name: m
    for m in (
        RblnQuantMethod("rbln-w4a16", "int4", "fp16", 4),
        RblnQuantMethod("rbln-w8a16", "int8", "fp16", 8),
        RblnQuantMethod("rbln-w8a8", "int8", "int8", 8),
        RblnQuantMethod("rbln-fp8", "fp8", "fp8", 8),
    )
}
#: Tensor-name suffixes optimum-rbln 0.12 accepts for per-layer weight scales.
SCALE_SUFFIXES = (".weight_scale", ".scales", ".w_scale", ".scale")


def method(name: str) -> RblnQuantMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError("quantization", name, "is not available on rbln",
                          f"Available on rbln: {', '.join(METHODS)}") from None


def safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte length, then JSON); no tensor is read."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return [k for k in header if k != "__metadata__"]


def check_prequantized(model_path: Path, name: str) -> None:
    files = sorted(Path(model_path).glob("*.safetensors"))
    if any(n.endswith(SCALE_SUFFIXES) for f in files for n in safetensors_names(f)):
        return
    raise ConfigError(
        "quantization", name,
        f"needs a checkpoint pre-quantized for RBLN (weights with per-layer scales); "
        f"{model_path} has none",
        "Quantize the model with Rebellions' tools first (see the optimum-rbln docs), "
        "or drop --quantization",
    )
