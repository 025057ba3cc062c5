"""Small random models built from a config: no downloads, seconds to create.

They reuse the embedded SmolLM2 tokenizer (vocab 49,152), so prompts are real
text. Weights are random but seeded, so outputs are reproducible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", tie_word_embeddings=True),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", tie_word_embeddings=False),
}


def default_tokenizer_dir() -> Path:
    from llmcore.models.loader import resolve_model

    return resolve_model(None)


def make_random_model(
    path: str | Path, arch: str = "llama", seed: int = 0, dtype: str = "float32", **overrides: Any
) -> Path:
    """Write a random Hugging Face model folder (config, safetensors, tokenizer) to ``path``.

    Uses transformers to build and save it, so the folder is exactly what a
    real checkpoint looks like and transformers can serve as the reference.
    """
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        hidden_act="silu",
    )
    cfg.update(ARCH_DEFAULTS[arch])
    cfg.update(overrides)
    config_cls = transformers.AutoConfig.for_model(cfg["model_type"]).__class__
    hf_cfg = config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf_cfg.architectures = cfg["architectures"]
    torch.manual_seed(seed)
    model_cls = getattr(transformers, cfg["architectures"][0])
    model = model_cls(hf_cfg).to(getattr(torch, dtype))
    # random init leaves tiny logits; scale up so greedy choices are not near-ties
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    tok_dir = default_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, path / name)
    (path / "llmcore-random.json").write_text(json.dumps({"arch": arch, "seed": seed, **overrides}))
    return path
