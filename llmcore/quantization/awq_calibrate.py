"""``llmcore quantize --method awq``: a local model + calibration text -> an AutoAWQ GEMM checkpoint.

AWQ's activation-aware scale search, in its simple form (Lin et al., 2023):
for each group of linear layers that read the same input (q/k/v; gate/up;
down; o when the attention is not grouped-query), with ``a`` the mean absolute
calibration activation per input channel, try ``s = a ** r`` for ``r`` on a
grid in [0, 1), quantize ``W * s`` to 4-bit groups (round-to-nearest, zero
points) and keep the ``r`` whose output ``x @ (Q(W s) / s)^T`` is closest to
``x @ W^T`` on the calibration tokens. ``r = 0`` is plain round-to-nearest, so
the search never does worse than it on the calibration data. The ``1 / s`` is
folded into the operation before (an RMSNorm weight, or the rows of v_proj /
up_proj), so the float model computes the same function and only the
quantization error changes.

Not done (AutoAWQ does it): the weight-clipping search, and re-collecting
inputs layer by layer after quantization. Calibration runs the float32 model
through Hugging Face transformers on the CPU; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcore.errors import ConfigError, ModelLoadError
from llmcore.models.loader import resolve_model
from llmcore.quantization.awq_format import pick_group_size, quantize_groups, to_checkpoint
from llmcore.quantization.handler import checkpoint_format

log = logging.getLogger("llmcore.quantization")

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")
LOSS_TOKENS = 256  # calibration tokens the loss of each candidate scale is measured on


@dataclass
class GroupResult:
    layer: int
    group: str
    ratio: float
    loss: float  # mean squared output error with the chosen scales
    rtn_loss: float  # the same with plain round-to-nearest (ratio 0)


@dataclass
class QuantizeReport:
    method: str = "awq"
    group_size: int = 128
    search: bool = True
    calibration_tokens: int = 0
    calibration_sha256: str = ""
    seconds: float = 0.0
    groups: list[GroupResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _group_sizes(model, requested: int | None) -> int:
    ins = {m.in_features for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"}
    if requested is not None:
        bad = sorted(k for k in ins if k % requested)
        if bad:
            ok = [g for g in (128, 64, 32) if all(k % g == 0 for k in ins)]
            raise ConfigError("group_size", requested, f"does not divide in_features {bad}",
                              f"Use {ok[0]}" if ok else "No AWQ group size (128, 64, 32) fits this model")
        return requested
    for g in (128, 64, 32):
        if all(pick_group_size(k, g) == g for k in ins):
            return g
    raise ConfigError("model", "", f"in_features {sorted(ins)} are not multiples of 32",
                      "AWQ needs group sizes dividing every layer's input width")


def _calibration_batches(tokenizer, text: str, max_tokens: int, seq_len: int) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 32:
        raise ConfigError("calibration", f"<{len(ids)} tokens>", "is too short",
                          "Give at least a few hundred tokens of text like the model's use (a few KB)")
    return [torch.tensor([ids[i : i + seq_len]]) for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1]


def _collect_inputs(model, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The input of every linear layer over the calibration tokens, ``{name: [T, in]}``."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            def hook(mod, args, _name=name):
                inputs.setdefault(_name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


def _fake_quant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    q, scales, zeros = quantize_groups(w, group_size)
    g = group_size
    return (q.float() - zeros.float().repeat_interleave(g, 1)) * scales.float().repeat_interleave(g, 1)


def _search(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, n_grid: int) -> tuple[torch.Tensor, float, float, float]:
    """Best per-input-channel scale for layers sharing input ``x``: ``(s, ratio, loss, rtn_loss)``."""
    w = torch.cat(weights).float()
    step = max(1, x.shape[0] // LOSS_TOKENS)
    xs = x[::step][:LOSS_TOKENS].float()
    ref = xs @ w.t()
    mean_act = x.abs().float().mean(0).clamp(min=1e-4)
    best = (torch.ones_like(mean_act), 0.0, math.inf)
    rtn = math.inf
    for i in range(n_grid):
        ratio = i / n_grid
        s = mean_act.pow(ratio)
        s = s / (s.max() * s.min()).sqrt()
        wq = _fake_quant(w * s, group_size) / s
        loss = float((xs @ wq.t() - ref).pow(2).mean())
        if i == 0:
            rtn = loss
        if loss < best[2]:
            best = (s, ratio, loss)
    return best[0], best[1], best[2], rtn


def _scale_groups(layer) -> list[tuple[str, list[torch.nn.Linear], torch.nn.Module, str]]:
    """``(group, linears, previous op, kind)`` for one decoder layer (kind: 'norm' or 'linear')."""
    a, m = layer.self_attn, layer.mlp
    groups = [("qkv", [a.q_proj, a.k_proj, a.v_proj], layer.input_layernorm, "norm")]
    if a.v_proj.weight.shape == a.o_proj.weight.shape:  # grouped-query attention: v and o do not line up
        groups.append(("o", [a.o_proj], a.v_proj, "linear"))
    groups.append(("gate_up", [m.gate_proj, m.up_proj], layer.post_attention_layernorm, "norm"))
    groups.append(("down", [m.down_proj], m.up_proj, "linear"))
    return groups


def _input_name(model, linear: torch.nn.Linear) -> str:
    for name, module in model.named_modules():
        if module is linear:
            return name
    raise KeyError("linear layer not in model")


def quantize_awq(model: str | Path | None, calibration: str | Path, output: str | Path, *,
                 group_size: int | None = None, search: bool = True, max_tokens: int = 1024,
                 seq_len: int = 512, n_grid: int = 20) -> QuantizeReport:
    """Write an AutoAWQ GEMM checkpoint of ``model`` to ``output``; returns what was done."""
    t0 = time.perf_counter()
    src = resolve_model(model)
    if checkpoint_format(src):
        raise ConfigError("model", str(src), f"is already quantized ({checkpoint_format(src)})",
                          "Quantize an unquantized (float) checkpoint")
    calibration = Path(calibration)
    if not calibration.is_file():
        raise ConfigError("calibration", str(calibration), "is not a file", "Pass a UTF-8 text file")
    text = calibration.read_text(encoding="utf-8")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("output", str(out), "exists and is not empty", "Pass a new or empty folder")
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:
        raise ModelLoadError(f"could not load {src} with transformers for calibration: {exc}") from exc
    g = _group_sizes(hf, group_size)
    report = QuantizeReport(group_size=g, search=search,
                            calibration_sha256=hashlib.sha256(text.encode()).hexdigest())
    batches = _calibration_batches(tokenizer, text, max_tokens, seq_len)
    report.calibration_tokens = sum(b.shape[1] for b in batches)
    layers = hf.model.layers
    if search:
        inputs = _collect_inputs(hf, batches)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for group, linears, prev, kind in _scale_groups(layer):
                    x = inputs[_input_name(hf, linears[0])]
                    s, ratio, loss, rtn = _search(x, [lin.weight for lin in linears], g, n_grid)
                    if kind == "norm":
                        prev.weight.div_(s)
                    else:
                        prev.weight.div_(s[:, None])
                        if prev.bias is not None:
                            prev.bias.div_(s)
                    for lin in linears:
                        lin.weight.mul_(s[None, :])
                    report.groups.append(GroupResult(i, group, ratio, loss, rtn))
        del inputs
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            q, scales, zeros = quantize_groups(module.weight, g)
            for key, t in to_checkpoint(q, scales, zeros).items():
                tensors[f"{name}.{key}"] = t
            quantized.add(f"{name}.weight")
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    for name, t in hf.state_dict().items():
        if name in quantized or (tied and name == "lm_head.weight"):
            continue
        tensors[name] = t.detach().to(torch.float16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    report.seconds = round(time.perf_counter() - t0, 2)
    (out / "llmcore-quantize.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
