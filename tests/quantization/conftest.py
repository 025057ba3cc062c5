"""Fixtures for the quantization tests: small random models and an AWQ checkpoint made from one."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
CALIBRATION = DATA / "calibration.txt"
PERPLEXITY = DATA / "perplexity.txt"


@pytest.fixture(autouse=True)
def _one_thread():
    # timing-insensitive tests: leave the shared cores to others
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mha_qwen2(tmp_path_factory):
    """Tied embeddings, q/k/v biases, as many KV heads as query heads (so AWQ scales v -> o too)."""
    from llmcore.testing.models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("mha") / "m", arch="qwen2", seed=3, hidden_size=128,
                             intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="session")
def awq_tiny(mha_qwen2, tmp_path_factory):
    from llmcore.quantization.awq_calibrate import quantize_awq

    out = tmp_path_factory.mktemp("awq") / "m"
    quantize_awq(mha_qwen2, CALIBRATION, out, max_tokens=512, seq_len=256)
    return out
