"""The handler behind every method: gpt-fast style, quantization is a module swap.

A handler has three steps, each optional but ``apply``:

* :meth:`QuantHandler.check_checkpoint` — read ``config.json`` only and refuse a
  checkpoint that does not fit the method, before any tensor is read;
* :meth:`QuantHandler.convert_weights` — rewrite the checkpoint's tensor stream
  into the names the model's ``load_weights`` expects (pre-quantized formats);
* :meth:`QuantHandler.apply` — swap the loaded float layers for quantized ones.

A handler that sets :attr:`QuantHandler.streaming` (every built-in one) splits
``apply`` into per-layer steps, so the runner can swap each decoder layer the
moment its weights are loaded, before the next is read: loading then needs the
quantized model plus one layer in float, not the whole float model (issue #8).
``apply`` on a whole loaded model runs the same steps and gives the same bits.

The model code stays single-purpose: it never knows it is quantized.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from llmcore.errors import ConfigError

log = logging.getLogger("llmcore.quantization")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_format(folder: str | Path) -> str | None:
    """``quantization_config.quant_method`` of a Hugging Face folder, lower case (None if absent)."""
    cfg = checkpoint_quant_config(folder)
    method = cfg.get("quant_method") if cfg else None
    return str(method).lower() if method else None


def checkpoint_quant_config(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization_config")
    return q if isinstance(q, dict) else None


class QuantHandler:
    """Base handler.

    A quantize-at-load method either overrides :meth:`apply` only (the runner then
    loads the whole float model and calls it once), or sets :attr:`streaming` and
    implements :meth:`quantize_linear` (and :meth:`quantize_output` if it touches the
    output projection): the runner then calls :meth:`quantize_loaded` for each part
    of the model as soon as it is loaded, and :meth:`finish` at the end.
    """

    #: quantizes one layer at a time while the checkpoint streams in (see the module docstring)
    streaming = False

    def __init__(self, method, device: str, dtype: str, **options: Any) -> None:
        self.method = method
        self.device = device  # device *kind*: "cpu", "cuda", ...
        self.dtype = dtype
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.options = options
        if dtype not in method.dtypes:
            raise ConfigError("dtype", dtype, f"is not supported by quantization {method.name}",
                              f"Use one of: {', '.join(method.dtypes)}")
        self.swapped = 0  # linear layers replaced so far (reset by finish)
        self.kept: list[tuple[int, ...]] = []  # shapes left in float: no kernel takes them

    def check_checkpoint(self, folder: Path) -> None:
        fmt = checkpoint_format(folder)
        if fmt is not None:
            raise ConfigError(
                "quantization", self.method.name,
                f"quantizes at load, but {folder} is already quantized ({fmt})",
                f"Load it with quantization={fmt!r} if llmcore supports it, or use an unquantized checkpoint",
            )

    def convert_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(weights)

    def apply(self, model: nn.Module) -> None:
        """Quantize a fully loaded float model, in place (the whole-model path)."""
        if not self.streaming:
            raise NotImplementedError(f"{type(self).__name__} must implement apply() or set streaming")
        self.quantize_linears(model, model)
        self.quantize_output(model)
        self.finish(model)

    # -- per-layer steps (streaming handlers)

    def quantize_loaded(self, model: nn.Module, name: str, module: nn.Module) -> None:
        """Quantize ``module`` (``model``'s submodule ``name``: a decoder layer, the embedding,
        the final norm, ``lm_head``) the moment all of its weights are loaded."""
        if module is output_module(model):
            self.quantize_output(model)
        else:
            self.quantize_linears(model, module, name)

    def quantize_linears(self, model: nn.Module, module: nn.Module, prefix: str = "") -> None:
        """Swap every ``nn.Linear`` inside ``module`` (``model`` itself: all of them), except
        the output projection, for what :meth:`quantize_linear` returns (None: keep it)."""
        for parent, name, layer in linear_layers(module):
            new = self.quantize_linear(layer)
            if new is None:
                self.kept.append(tuple(layer.weight.shape))
                continue
            setattr(parent, name, new)
            self.swapped += 1

    def quantize_linear(self, layer: nn.Linear) -> nn.Module | None:
        raise NotImplementedError

    def quantize_output(self, model: nn.Module) -> None:
        """The output projection (and a tied embedding); called once it is loaded. Default: keep it."""

    def finish(self, model: nn.Module) -> None:
        """After the last layer: give the freed float weights back to the OS and log what was done."""
        release_freed_memory()
        self.log_summary(model)
        self.swapped, self.kept = 0, []

    def log_summary(self, model: nn.Module) -> None:
        log.info("%s: %d linear layers quantized%s", self.method.name, self.swapped,
                 f"; kept float (shape unsupported): {self.kept}" if self.kept else "")


# ------------------------------------------------------------------ model walking


def linear_layers(model: nn.Module, include_output: bool = False) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, layer)`` for every ``nn.Linear``; the output projection only if asked."""
    found = []
    for pname, parent in model.named_modules():
        for cname, child in parent.named_children():
            if not isinstance(child, nn.Linear):
                continue
            if not include_output and parent is model and cname == "lm_head":
                continue
            found.append((parent, cname, child))
    return found


def output_weight(model: nn.Module) -> tuple[torch.Tensor, bool]:
    """The output projection's weight and whether it is tied to the input embedding."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        return lm_head.weight, False
    return model.model.embed_tokens.weight, True


def output_module(model: nn.Module) -> nn.Module | None:
    """The module that holds the output projection's weight: ``lm_head``, or a tied input embedding."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        return lm_head
    backbone = getattr(model, "model", None)
    return getattr(backbone, "embed_tokens", None)


def set_output(model: nn.Module, module: nn.Module) -> None:
    if getattr(model, "lm_head", None) is not None:
        model.lm_head = module
    else:
        model.logits_proj = module


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight tensor the model holds, each storage counted once.

    Counts parameters, buffers, tensors held as plain attributes (prepacked
    weights) and bitsandbytes' quantization state (absmax, code tables); not
    the RoPE tables, which are not weights.
    """
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # opaque layouts (oneDNN-prepacked weights)
            key, size = id(t), t.numel() * t.element_size()
        if key in seen:
            return
        seen.add(key)
        total += size

    for module in model.modules():
        for p in module.parameters(recurse=False):
            add(p)
            state = getattr(p, "quant_state", None)
            if state is not None:
                for v in vars(state).values():
                    add(v)
                    if hasattr(v, "__dict__"):  # nested state (double quantization)
                        for w in vars(v).values():
                            add(w)
            add(getattr(p, "SCB", None))
        for b in module.buffers(recurse=False):
            add(b)
        for name, value in vars(module).items():  # tensors kept as plain attributes (prepacked weights)
            if isinstance(value, torch.Tensor) and not name.startswith("rope_"):
                add(value)
    return total


def release_freed_memory() -> None:
    """Hand the float weights just replaced back to the OS.

    Quantizing frees hundreds of MB in pieces that glibc's allocator keeps
    mapped (a SmolLM2 AWQ load: 1.3 GB resident, 0.8 GB after a trim).
    """
    gc.collect()
    trim_malloc()


def trim_malloc() -> None:
    """``malloc_trim(0)``: return glibc's free heap pages to the OS (no-op elsewhere).

    Cheap enough to call after every layer of a load (no garbage collection): the
    float weights a layer frees otherwise stay resident in whichever thread's arena
    held them, and the next layer's allocations do not always reuse them.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
