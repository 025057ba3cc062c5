"""Perplexity and memory of each method on the embedded SmolLM2-135M, against the unquantized model.

Perplexity is measured on the first 256 tokens of tests/data/perplexity.txt
(bf16, through the engine's own prompt logprobs). The unquantized model
scores 19.8 there. Stated bounds, with the values measured when they were set:

========  =========  ========
method    bound      measured
========  =========  ========
eetq      +2%        -0.9%
int4      +2%        +0.0%  (the model ships as Q4_1: groups of 32 with an offset hold it exactly)
bnb-int8  +5%        +1.5%
bnb-nf4   +30%       +17%
========  =========  ========

awq on this model is measured by benchmarks/quant_bench.py (its calibration
takes minutes); its round trip is tested on small models in test_awq_roundtrip.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

from llmcore import Engine, SamplingParams
from llmcore.quantization.handler import weight_bytes
from llmcore.quantization.quality import PERPLEXITY_TEXT, perplexity, token_nlls

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
TOKENS = 256
BOUNDS = {"eetq": 1.02, "int4": 1.02, "bnb-int8": 1.05, "bnb-nf4": 1.30}


def load(quantization=None):
    return Engine(device="cpu", dtype="bfloat16", quantization=quantization, progress=False,
                  kv_cache_memory=64 << 20, max_num_seqs=4)


@pytest.fixture(scope="module")
def baseline():
    # the torch decode path, as bnb's: its bytes include the oneDNN-prepacked copy of the output
    # projection that the torch path keeps (the CPU's native decode step reads weights in place)
    e = Engine(device="cpu", dtype="bfloat16", progress=False, kv_cache_memory=64 << 20, max_num_seqs=4,
               native_decode=False)
    return perplexity(e, max_tokens=TOKENS), weight_bytes(e.runner.model), e.model_config


@pytest.mark.parametrize("method", list(BOUNDS))
def test_perplexity_generation_and_memory(method, baseline):
    if method.startswith("bnb") and not HAVE_BNB:
        pytest.skip("bitsandbytes is not installed")
    base_ppl, base_bytes, c = baseline
    e = load(method)
    ppl = perplexity(e, max_tokens=TOKENS)
    assert ppl < base_ppl * BOUNDS[method], (method, ppl, base_ppl)
    text = e.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text
    assert "Paris" in text
    got = weight_bytes(e.runner.model)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = [(q + 2 * kv, c.hidden_size), (c.hidden_size, q), (2 * c.intermediate_size, c.hidden_size),
              (c.hidden_size, c.intermediate_size)] * c.num_layers
    norms = (2 * c.num_layers + 1) * c.hidden_size * 2
    table = c.vocab_size * c.hidden_size
    if method == "eetq":  # int8 + bf16 row scales; one int8 table for embedding and output
        assert got == sum(n * k + 2 * n for n, k in shapes) + table + 2 * c.vocab_size + norms
    elif method == "int4":  # nibbles + bf16 scale and offset per 32 weights; int8 table
        assert got == sum(n * k // 2 + (k // 32) * n * 4 for n, k in shapes) + table + 2 * c.vocab_size + norms
    else:  # bnb: the layers shrink, the bf16 table and its prepacked output copy stay
        linears_bf16 = sum(2 * n * k for n, k in shapes)
        factor = 0.5 if method == "bnb-int8" else 0.25
        assert got < base_bytes - linears_bf16 * (1 - factor) * 0.95
    # the exact sizes are asserted above; this is the headline ratio to the bf16 model
    assert got < base_bytes * {"eetq": 0.51, "int4": 0.40}.get(method, 0.7)


@pytest.mark.parametrize("method", ["eetq", "int4"])
def test_prompts_on_int8_activations_within_the_bound(method):
    """Prompts in windows of 64 tokens, over 1,024 tokens of the text. With AVX-512 VNNI the native
    products of more than two rows (prompt chunks, batched decode) take int8 activations: 4-bit
    layers per block of 32 up to 64 rows (llmcore_cpu.native.q4_integer_rows), int8 (eetq) layers
    and int4's int8 output projection per block of 64 (decode.cpp ptile_i8q). Measured on the
    AVX-512 EPYC against bf16's 29.93 on the same windows: eetq 30.14 (+0.7%), int4 30.10 (+0.6%);
    in 1,024-token windows +0.0% and +0.5%. The same +2% bound as the float products (on 256
    tokens the sample is too small: int4 scored +2.3% there)."""
    base = Engine(device="cpu", dtype="bfloat16", progress=False, kv_cache_memory=64 << 20, max_num_seqs=4,
                  native_decode=False)
    e = load(method)
    ids = base.tokenizer.encode(PERPLEXITY_TEXT.read_text())[:1024]
    ppl = {name: math.exp(sum(n) / len(n)) for name, n in
           (("base", token_nlls(base, ids, 64)), (method, token_nlls(e, ids, 64)))}
    assert ppl[method] < ppl["base"] * BOUNDS[method], ppl
