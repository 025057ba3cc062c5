"""oneDNN-prepacked linear layers for bfloat16 on the CPU.

``F.linear`` on a bf16 weight re-lays the weight out for oneDNN on every call;
for decode (one row per sequence) that reorder costs more than the product: the
49,152 x 576 SmolLM2 output projection took ~9 ms per token plain and ~1.2 ms
prepacked on this project's 2-core machine (same results bit for bit). This is
what torch.compile's freezing pass does for CPU; doing it eagerly keeps start-up
instant. Applied only where oneDNN supports it (bf16 weights, mkldnn built in).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

log = logging.getLogger("llmcore.cpu")


def packing_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.zeros(8, 8, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
        return True
    except Exception as exc:  # older torch or a build without oneDNN
        log.info("oneDNN weight prepacking unavailable: %s", exc)
        return False


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, hint: int = 1) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)


def _min_time(fn, rounds: int = 7) -> float:
    """Best of ``rounds``: other load on the machine only ever adds time."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def choose_variant(weight: torch.Tensor, batch: int) -> int | None:
    """Packing hint that is fastest for this shape (None = plain F.linear).

    Scored by per-token cost at one row (single-stream decode) plus per-token
    cost at ``batch`` rows (batched decode).
    """
    k = weight.shape[1]
    xs = {m: torch.randn(m, k, dtype=weight.dtype) for m in (1, batch)}
    scores: dict[int | None, float] = {}
    with torch.inference_mode():
        for hint in (None, 1, batch):
            if hint is None:
                fns = {m: (lambda x=x: torch.nn.functional.linear(x, weight)) for m, x in xs.items()}
            else:
                layer = PackedLinear(weight, None, hint)
                fns = {m: (lambda x=x, layer=layer: layer(x)) for m, x in xs.items()}
            scores[hint] = _min_time(fns[1]) + _min_time(fns[batch]) / batch
    return min(scores, key=scores.get)


def pack_model(model: nn.Module, batch: int = 32) -> dict[tuple[int, int], int | None]:
    """Swap bf16 linears (and the output projection) for prepacked ones where faster.

    Returns the choice per weight shape (None = left as plain ``F.linear``).
    """
    if not packing_available():
        return {}
    choices: dict[tuple[int, int], int | None] = {}

    def pick(w: torch.Tensor) -> int | None:
        shape = tuple(w.shape)
        if shape not in choices:
            choices[shape] = choose_variant(w, batch)
        return choices[shape]

    count = 0
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
                hint = pick(child.weight)
                if hint is not None:
                    setattr(module, child_name, PackedLinear(child.weight, child.bias, hint))
                    count += 1
    if getattr(model, "lm_head", None) is None and hasattr(model, "model"):
        emb = model.model.embed_tokens.weight
        if emb.dtype == torch.bfloat16:
            hint = pick(emb)
            if hint is not None:
                model.logits_proj = PackedLinear(emb, None, hint)
                count += 1
    log.info("prepacked %d bf16 linear layers for oneDNN (choice per shape: %s)", count, choices)
    return choices
