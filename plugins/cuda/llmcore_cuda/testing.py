"""Random model folders for GPU tests and benchmarks, with no downloaded files.

:func:`llmcore.testing.models.make_random_model` copies the embedded SmolLM2
tokenizer, which the GPU image does not have (and whose 49,152-token vocabulary
is smaller than Llama's 128,256). This builds the same kind of folder with a
generated word-level tokenizer covering the model's whole vocabulary, so any
sampled id decodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
)


def write_wordlevel_tokenizer(path: str | Path, vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> None:
    """tokenizer.json + tokenizer_config.json: token ``i`` is the word ``t{i}``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<unk>"] = 0
    vocab.pop("t0")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    inv = {i: w for w, i in vocab.items()}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": inv[bos_id], "eos_token": inv[eos_id],
        "unk_token": "<unk>", "model_max_length": 1 << 20, "add_bos_token": False,
    }))


def make_model_folder(path: str | Path, arch: str = "llama", seed: int = 0, dtype: str = "float32",
                      init_std: float | None = 0.08, **overrides: Any) -> Path:
    """A random Hugging Face folder (config, safetensors, tokenizer) built by transformers."""
    import torch
    import transformers

    from llmcore.testing.models import ARCH_DEFAULTS

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = dict(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, hidden_act="silu",
    )
    cfg.update(ARCH_DEFAULTS[arch])
    cfg.update(overrides)
    config_cls = transformers.AutoConfig.for_model(cfg["model_type"]).__class__
    hf_cfg = config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf_cfg.architectures = cfg["architectures"]
    torch.manual_seed(seed)
    model_cls = getattr(transformers, cfg["architectures"][0])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_cls(hf_cfg)
    model = model.to(getattr(torch, dtype))
    if init_std is not None:
        # random init leaves tiny logits; larger weights make greedy choices clear
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    model.save_pretrained(path, safe_serialization=True)
    write_wordlevel_tokenizer(path, cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
    (path / "llmcore-random.json").write_text(json.dumps({"arch": arch, "seed": seed, **overrides}))
    del model
    return path
