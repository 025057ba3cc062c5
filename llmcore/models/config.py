"""Model configuration read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmcore.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: q,k,v,o biases
    qkv_bias: bool = False  # qwen2: q,k,v biases only
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hidden_act: str = "silu"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        arch = archs[0] if archs else _ARCH_FROM_TYPE.get(model_type, "")
        if not arch:
            raise ModelLoadError(
                f"config.json has no 'architectures' and model_type={model_type!r} is unknown; "
                f"supported: {', '.join(sorted(_ARCH_FROM_TYPE.values()))}"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in cfg]
        if missing and arch not in _ARCH_FROM_TYPE.values():
            # another family's config (GPT-2 names its fields n_head, n_embd...): say so, not the key
            raise ModelLoadError(
                f"architecture {arch!r} (model_type {model_type!r}) is not supported; supported: "
                f"{', '.join(sorted(_ARCH_FROM_TYPE.values()))}, and those a device plugin adds "
                "(llmcore devices lists the plugins)"
            )
        if missing:
            raise ModelLoadError(f"config.json has no {missing[0]!r}, which a {arch} model needs")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ModelLoadError(
                    f"rope_scaling type {rtype!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}"
                )
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        is_qwen2 = model_type == "qwen2"
        attention_bias = bool(cfg.get("attention_bias", False))
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"hidden_act={act!r} is not supported (silu only)")
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            raise ModelLoadError("sliding-window attention is not supported yet (use_sliding_window=true)")
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hidden_act=act,
            raw=cfg,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise ModelLoadError(f"no config.json in {path}") from None
        except (KeyError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{p} is not a usable model config: {exc}") from exc

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        return d


_REQUIRED_KEYS = ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")

_ARCH_FROM_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
