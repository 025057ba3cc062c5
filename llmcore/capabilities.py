"""What a device can do, as data.

A plugin's probe answers with a :class:`DeviceProbe` that carries a score and
:class:`Capabilities`. The engine validates a configuration against the
capabilities *before* any weight is loaded, so an unsupported combination is
one clear error instead of a stack trace deep in a vendor SDK.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

KV_PAGED = "paged"  # fixed-size blocks, block tables, any sequence in any slot
KV_FIXED_SLOTS = "fixed-slots"  # one preallocated region per batch slot (static graphs)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Static facts about a device that decide what the engine may ask of it.

    Optional members carry a default that states the conservative answer, so a
    plugin written against an older contract still describes itself correctly.
    """

    dtypes: tuple[str, ...] = ("float32",)
    default_dtype: str = "float32"
    quantization: tuple[str, ...] = ()
    kv_layout: str = KV_PAGED
    needs_compile: bool = False
    static_shapes: bool = False
    # Bytes usable for weights + KV on one device (one core for Neuron); None = unknown.
    memory_bytes: int | None = None
    device_count: int = 1
    tensor_parallel: bool = False
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    # KV block size (tokens) used when the user sets none: smaller blocks waste less memory in
    # each sequence's last, partly filled block; kernels may need a minimum
    default_block_size: int = 16
    # constrained decoding (JSON schema, regex, grammar): the logits reach llmcore's sampler, which
    # masks them. False for a device that samples on the device and never returns logits; the
    # engine then refuses constrained requests naming the device
    structured_output: bool = True
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kv_layout not in (KV_PAGED, KV_FIXED_SLOTS):
            raise ValueError(
                f"kv_layout={self.kv_layout!r} is not one of {KV_PAGED!r}, {KV_FIXED_SLOTS!r}"
            )
        if self.default_dtype not in self.dtypes:
            raise ValueError(
                f"default_dtype={self.default_dtype!r} is not in dtypes={self.dtypes!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DeviceProbe:
    """A plugin's answer to "can you run here, and how well?".

    ``score`` 0 means unusable; ``reason`` then says why in words a user can act
    on (driver missing, SDK not installed, no device found) and ``hint`` says
    what would fix it. Higher scores win automatic selection.
    """

    name: str
    score: int
    capabilities: Capabilities = field(default_factory=Capabilities)
    reason: str = ""
    hint: str = ""
    description: str = ""  # e.g. "NVIDIA H100 80GB (sm_90)", "2-core x86_64 CPU"
    plugin_version: str = ""

    @property
    def usable(self) -> bool:
        return self.score > 0

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "score": self.score,
            "usable": self.usable,
            "reason": self.reason,
            "hint": self.hint,
            "description": self.description,
            "plugin_version": self.plugin_version,
        }
        out["capabilities"] = self.capabilities.to_dict()
        return out


@dataclass(frozen=True)
class QuantMethod:
    """One weight-quantization method and where it runs.

    :param name: what users type (``--quantization NAME``).
    :param devices: device names it is implemented for.
    :param dtypes: activation dtypes it computes in.
    :param prequantized: True if it loads a checkpoint quantized ahead of time
        (for example by ``llmcore quantize``); False if it quantizes at load.
    :param bits: bits per weight of the quantized layers.
    :param loader: ``"module:function"`` (imported on first use, so probes stay
        torch-free) or a callable ``loader(device: str, dtype: str, **options)``
        returning a handler (see :class:`llmcore.quantization.handler.QuantHandler`).
    :param requires: modules that must be importable on every device.
    :param requires_on: extra modules per device (e.g. ``{"cuda": ("triton",)}``).
    :param checkpoint_format: for pre-quantized methods, the ``quant_method`` a
        checkpoint's ``config.json`` ``quantization_config`` must carry.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    prequantized: bool
    bits: int
    description: str
    loader: str | Callable[..., Any]
    requires: tuple[str, ...] = ()
    requires_on: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    checkpoint_format: str | None = None
    install_hint: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower():
            raise ValueError(f"quantization method name {self.name!r} must be non-empty lower case")
        if not self.devices:
            raise ValueError(f"quantization method {self.name!r} declares no devices")
        if self.bits <= 0:
            raise ValueError(f"quantization method {self.name!r}: bits={self.bits} must be positive")
        if self.prequantized and not self.checkpoint_format:
            raise ValueError(f"pre-quantized method {self.name!r} must name its checkpoint_format")

    def __hash__(self) -> int:  # requires_on is a dict; the name identifies a method
        return hash(self.name)

    def missing(self, device: str) -> list[str]:
        """Required modules that are not importable for ``device`` (cheap: find_spec only)."""
        needed = (*self.requires, *self.requires_on.get(device, ()))
        return [m for m in needed if not _importable(m)]

    def available_on(self, device: str) -> bool:
        return device in self.devices and not self.missing(device)

    def load(self, device: str, dtype: str, **options: Any):
        """Build this method's handler for ``device`` computing in ``dtype``."""
        loader = self.loader
        if isinstance(loader, str):
            module, _, attr = loader.partition(":")
            loader = getattr(importlib.import_module(module), attr)
        return loader(method=self, device=device, dtype=dtype, **options)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
