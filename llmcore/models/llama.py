"""Llama-family decoder (Llama, Mistral, SmolLM, Qwen2, Qwen3) over a paged KV cache.

Numerics follow Hugging Face transformers (RMSNorm in float32, RoPE tables in
float32 cast to the model dtype, SiLU-gated MLP) so greedy output matches it
token for token in float32. Projections are fused at load (q/k/v into one
matmul, gate/up into one) because decode on a CPU is dominated by per-op
overhead and weight reads.

Inputs are flat: ``T`` tokens from every sequence of the step, concatenated;
attention metadata says which tokens belong together.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.errors import ModelLoadError
from llmcore.models.config import ModelConfig
from llmcore.contract import AttentionBackend, AttentionMetadata


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, as transformers computes them."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rtype == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq, 1.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache, meta, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# HF checkpoint names that land in a slice of one of our fused parameters (also read by the AWQ loader)
STACKED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family model; the runner owns KV tensors and the backend."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.backend: AttentionBackend | None = None
        # a device may install its own output projection (e.g. prepacked weights)
        self.logits_proj: nn.Module | None = None
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    # ----------------------------------------------------------------- set-up

    def init_rope(self, max_positions: int, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq, scaling = rope_inv_freq(self.config)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos = (emb.cos() * scaling).to(device=device, dtype=dtype)
        self.rope_sin = (emb.sin() * scaling).to(device=device, dtype=dtype)

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        on_loaded: Callable[[str, nn.Module], None] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Copy checkpoint tensors (Hugging Face names, in any order) into the parameters.

        The model loads in parts: each decoder layer (``model.layers.N``) and each other module
        that holds parameters (``model.embed_tokens``, ``model.norm``, ``lm_head``). A part still
        on the meta device is allocated on ``device`` in ``dtype`` when its first tensor arrives,
        and ``on_loaded(name, module)`` is called the moment its last one has, before the next
        tensor is read: the runner quantizes the part there, so a model built on the meta device
        never holds more float weights than the parts in flight (one, for a checkpoint stored
        layer by layer; all of them, if one interleaves its layers). A tensor for a part already
        handed to ``on_loaded`` is refused: that part may have been replaced.
        """
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv_offsets = [(0, q), (q, kv), (q + kv, kv)]
        gu = cfg.intermediate_size
        gate_up_offsets = [(0, gu), (gu, gu)]

        def part_of(pname: str) -> str:
            if pname.startswith("model.layers."):
                return ".".join(pname.split(".", 3)[:3])
            return pname.rpartition(".")[0]

        # names only: holding the parameters would keep each part's float weights alive after
        # ``on_loaded`` swapped them out
        names = [pname for pname, _ in self.named_parameters()]
        pending: dict[str, set[str]] = {}  # part -> "param#shard" keys not loaded yet
        for pname in names:
            if "qkv_proj" in pname:
                keys = {f"{pname}#{i}" for i in range(3)}
            elif "gate_up_proj" in pname:
                keys = {f"{pname}#{i}" for i in range(2)}
            else:
                keys = {f"{pname}#None"}
            pending.setdefault(part_of(pname), set()).update(keys)
        known = set(names)
        done: set[str] = set()

        def copy_in(name: str, target: str, shard: int | None, tensor: torch.Tensor, part: str) -> None:
            param = self.get_parameter(target)
            if param.is_meta:
                if device is None or dtype is None:
                    raise ModelLoadError(f"{part} is on the meta device: load_weights needs device= and dtype=")
                self.get_submodule(part).to(dtype=dtype).to_empty(device=device)
                param = self.get_parameter(target)
            with torch.no_grad():
                if shard is None:
                    dst = param.data
                else:
                    offsets = qkv_offsets if "qkv_proj" in target else gate_up_offsets
                    start, size = offsets[shard]
                    dst = param.data.narrow(0, start, size)
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ModelLoadError(
                        f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(dst.shape)}"
                    )
                dst.copy_(tensor)

        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            target, shard = name, None
            for hf, (ours, idx) in STACKED_PROJECTIONS.items():
                if f".{hf}." in name:
                    target, shard = name.replace(f".{hf}.", f".{ours}."), idx
                    break
            if target not in known:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {cfg.architecture}")
            part = part_of(target)
            if part in done:
                raise ModelLoadError(f"checkpoint tensor {name!r} arrived after the rest of {part} was loaded "
                                     "(is it stored twice?)")
            copy_in(name, target, shard, tensor, part)
            del tensor
            keys = pending[part]
            keys.discard(f"{target}#{shard}")
            if not keys:
                done.add(part)
                if on_loaded is not None:
                    on_loaded(part, self.get_submodule(part))
        missing = sorted(k.split("#")[0] for keys in pending.values() for k in keys)
        if missing:
            raise ModelLoadError(
                f"checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}"
            )

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # hidden states [T, hidden]
        x = self.model.embed_tokens(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        for layer, kv in zip(self.model.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta, self.backend)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.logits_proj is not None:
            return self.logits_proj(hidden)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.model.embed_tokens.weight)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass


ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
