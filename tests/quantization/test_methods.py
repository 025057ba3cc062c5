"""Each method loads, generates and shrinks the weights by what its bits say (small random models)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmcore import Engine, SamplingParams
from llmcore.quantization.awq import Int4Linear
from llmcore.quantization.handler import weight_bytes
from llmcore.quantization.int8 import Int8Linear

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed")


def engine(model, quantization=None, dtype="bfloat16", **kw):
    return Engine(model=str(model), device="cpu", dtype=dtype, quantization=quantization, progress=False,
                  num_kv_blocks=32, max_num_seqs=4, **kw)


def greedy(e, n=8):
    out = e.generate(["The river runs through", "Bread needs flour"], SamplingParams(max_tokens=n, temperature=0,
                                                                                     ignore_eos=True))
    return [o.outputs[0].token_ids for o in out]


def linear_shapes(model_dir):
    from llmcore.models.config import ModelConfig

    c = ModelConfig.from_path(model_dir)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = [(q + 2 * kv, c.hidden_size), (c.hidden_size, q), (2 * c.intermediate_size, c.hidden_size),
                 (c.hidden_size, c.intermediate_size)]
    return c, per_layer * c.num_layers


def norm_bytes(c, itemsize=2):
    return (2 * c.num_layers + 1) * c.hidden_size * itemsize


def test_eetq_weight_bytes_are_exactly_int8_plus_scales(tiny_llama):
    e = engine(tiny_llama, "eetq")
    c, shapes = linear_shapes(tiny_llama)
    linears = sum(n * k + 2 * n for n, k in shapes)  # int8 codes + one bf16 scale per row
    head = c.vocab_size * c.hidden_size + 2 * c.vocab_size
    embedding = c.vocab_size * c.hidden_size * 2  # untied: the input table stays bf16
    assert weight_bytes(e.runner.model) == linears + head + embedding + norm_bytes(c)
    # int8 everywhere: torch's int8pack kernel, or the native CPU step's panels (llmcore_cpu.native)
    kinds = {(m.kernel, m.weight.dtype) for m in e.runner.model.modules()
             if isinstance(m, Int8Linear) or type(m).__name__ == "PanelLinear"}
    assert kinds and kinds <= {("int8pack", torch.int8), ("native-panels", torch.int8)}
    assert all(len(t) == 8 for t in greedy(e))


def test_eetq_tied_embedding_shares_the_int8_table(mha_qwen2):
    e = engine(mha_qwen2, "eetq")
    model = e.runner.model
    c, shapes = linear_shapes(mha_qwen2)
    emb, head = model.model.embed_tokens, model.logits_proj
    # Int8Embedding + Int8Linear, or the native CPU step's panel forms of the same table
    assert {type(emb).__name__, type(head).__name__} in ({"Int8Embedding", "Int8Linear"},
                                                         {"PanelEmbedding", "PanelLinear"})
    assert emb.weight.dtype == torch.int8 and emb.weight.data_ptr() == head.weight.data_ptr()
    biases = c.num_layers * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim * 2  # qwen2's q/k/v bias, bf16
    expected = sum(n * k + 2 * n for n, k in shapes) + c.vocab_size * (c.hidden_size + 2) + biases + norm_bytes(c)
    assert weight_bytes(model) == expected
    # 8-bit weights keep this model's clear greedy choices: the tokens agree up to the first
    # near-tie of the float model (a random model's distributions are flat: top-2 gaps of 0.05 nats)
    fp = engine(mha_qwen2)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    prompts = ["The river runs through", "Bread needs flour"]
    for q, f in zip(e.generate(prompts, params), fp.generate(prompts, params)):
        gaps = [sorted((lp.logprob for lp in d.values()), reverse=True) for d in f.outputs[0].logprobs]
        clear = next((i for i, g in enumerate(gaps) if g[0] - g[1] < 0.1), len(gaps))
        assert clear >= 3
        assert q.outputs[0].token_ids[:clear] == f.outputs[0].token_ids[:clear]


def test_int4_weight_bytes_are_half_a_byte_plus_group_scales(tiny_llama):
    # the torch path's Int4Linear (the CPU's native step reads these layers into its own layout,
    # Q4Linear, with float32 scales and offsets: tests/cpu/test_native_decode.py)
    e = engine(tiny_llama, "int4", native_decode=False)
    model = e.runner.model
    c, shapes = linear_shapes(tiny_llama)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * c.num_layers and {m.group_size for m in layers} == {32}
    linears = sum(n * k // 2 + (k // 32) * n * 2 * 2 for n, k in shapes)  # nibbles + bf16 scale and offset
    head = c.vocab_size * c.hidden_size + 2 * c.vocab_size  # output projection int8
    embedding = c.vocab_size * c.hidden_size * 2
    assert weight_bytes(model) == linears + head + embedding + norm_bytes(c)
    assert all(len(t) == 8 for t in greedy(e))


@needs_bnb
@pytest.mark.parametrize("method,low,high", [("bnb-int8", 0.50, 0.56), ("bnb-nf4", 0.25, 0.33)])
def test_bnb_layers_shrink_by_their_bits(tiny_llama, method, low, high):
    import bitsandbytes as bnb

    fp, q = engine(tiny_llama, dtype="float32"), engine(tiny_llama, method, dtype="float32")
    cls = bnb.nn.Linear8bitLt if method == "bnb-int8" else bnb.nn.Linear4bit
    layers = q.runner.model.model.layers
    assert sum(isinstance(m, cls) for m in layers.modules()) == 4 * len(layers)
    ratio = weight_bytes(layers) / weight_bytes(fp.runner.model.model.layers)
    # float32 -> 8 bits is 1/4 of the bytes, -> 4 bits 1/8, plus scales and the float norms
    assert low / 2 < ratio < high / 2
    assert all(len(t) == 8 for t in greedy(q))


@needs_bnb
@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
@pytest.mark.parametrize("fixture", ["mha_qwen2", "tiny_llama"])  # tied head, separate lm_head
def test_bnb_keeps_the_output_projection(fixture, method, request):
    """bitsandbytes quantizes the decoder's linear layers only: the logits are the checkpoint's
    float head applied to the final hidden state, bit for bit (an 8- or 4-bit head is ~1e-2 off)."""
    from safetensors.torch import load_file

    model_dir = request.getfixturevalue(fixture)
    e = engine(model_dir, method, dtype="float32")
    model = e.runner.model
    assert any(type(m).__module__.startswith("bitsandbytes") for m in model.model.layers.modules())
    tensors = load_file(str(model_dir / "model.safetensors"))
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    hidden = torch.randn(3, head.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.compute_logits(hidden), torch.nn.functional.linear(hidden, head))
    assert all(len(t) == 8 for t in greedy(e))


def test_quantized_engine_serves_batches_like_single_requests(mha_qwen2):
    e = engine(mha_qwen2, "int4", dtype="float32")
    both = greedy(e)
    alone = [e.generate(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
             for p in ("The river runs through", "Bread needs flour")]
    assert both == alone


def test_dtype_the_method_does_not_support_is_refused(tiny_llama, monkeypatch):
    import dataclasses

    import llmcore.quantization.builtin as builtin
    from llmcore.errors import ConfigError

    only_fp16 = tuple(dataclasses.replace(m, dtypes=("float16",)) if m.name == "eetq" else m
                      for m in builtin.BUILTIN_METHODS)
    monkeypatch.setattr(builtin, "BUILTIN_METHODS", only_fp16)
    with pytest.raises(ConfigError, match="dtype='bfloat16': is not supported by quantization eetq"):
        engine(tiny_llama, "eetq")


def test_int8_and_int4_outputs_stay_close_to_float(mha_qwen2):
    """Logits of the quantized model against the float one on the same hidden states."""
    fp = engine(mha_qwen2, dtype="float32").runner.model
    torch.manual_seed(0)
    hidden = torch.randn(6, fp.config.hidden_size)
    with torch.no_grad():
        ref = fp.compute_logits(hidden)
    for method, bound in (("eetq", 0.02), ("int4", 0.02)):
        q = engine(mha_qwen2, method, dtype="float32").runner.model
        with torch.no_grad():
            rel = float((q.compute_logits(hidden) - ref).abs().max() / ref.abs().max())
        assert rel < bound, (method, rel)
