"""Configs of well-known models, for planning tests: no weights, just the shapes that size them."""

from __future__ import annotations

from llmcore.models.config import ModelConfig

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}


def llama2_7b() -> ModelConfig:
    return ModelConfig.from_dict(dict(LLAMA2_7B))


def smollm2_135m() -> ModelConfig:
    return ModelConfig.from_dict(dict(SMOLLM2_135M))
