"""The CUDA runner with quantized layers, on the CPU through Triton's interpreter.

The quantized modules are forced onto the Triton kernels CUDA runs (the handlers would pick
torch's CPU kernels for CPU tensors), so this covers what the GPU runs: the fused forward
calling the swapped modules in prefill (``forward``), batch-1 decode (``forward_small``,
GEMV path) and 2-4 row decode (small-batch path) through the graph buckets, the int8 output
projection and a tied embedding reading the int8 table. The reference is the core CPU
runner with the same method (torch's CPU int8/int4 kernels), float32, token for token.

bitsandbytes' layers run its CPU backend here (the runner's decisions are the same: bnb-nf4
through the graph buckets, bnb-int8 eagerly). Runs with ``TRITON_INTERPRET=1`` (CI sets it),
at sizes that take CI about 20 s per method; on a GPU the same paths are covered by
test_gpu_quantization.py.
"""

from __future__ import annotations

import random

import pytest

from llmcore import Engine, SamplingParams
from tests.conftest import interpreted_only

pytestmark = interpreted_only

SHAPES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("triton")
    from llmcore_cuda.testing import make_model_folder

    root = tmp_path_factory.mktemp("q")
    # qwen2: tied embeddings and q/k/v biases; llama: a separate lm_head
    return {arch: make_model_folder(root / arch, arch, **SHAPES) for arch in ("qwen2", "llama")}


@pytest.fixture(scope="module")
def awq_folder(folders, tmp_path_factory):
    from llmcore.quantization.awq_calibrate import quantize_awq

    root = tmp_path_factory.mktemp("awq")
    rng = random.Random(0)
    calib = root / "calibration.txt"
    calib.write_text(" ".join(f"t{rng.randrange(3, SHAPES['vocab_size'])}" for _ in range(600)))
    out = root / "m"
    quantize_awq(folders["qwen2"], calib, out, group_size=32, search=False, max_tokens=256, seq_len=128)
    return out


def force_triton(monkeypatch):
    from llmcore.quantization import awq, int8

    monkeypatch.setattr(int8, "pick_kernel", lambda device: "triton")
    monkeypatch.setattr(awq, "pick_kernel",
                        lambda device, n, k, g: "triton" if k % g == 0 and n % 8 == 0 else None)


def engines(folder, method, monkeypatch, **kw):
    from llmcore_cuda.testing import cpu_runner  # imports triton (optional)

    # 4-bit: the CPU's torch path as the reference (float32 products, as the CUDA kernels): the native
    # step's 4-bit products take int8 activations (up to 64 rows with AVX-512 VNNI, docs/cpu.md)
    native = method not in ("int4", "awq")
    ref = Engine(model=str(folder), device="cpu", dtype="float32", quantization=method, progress=False,
                 native_decode=native, **kw)
    eng = Engine(model=str(folder), device="cpu", dtype="float32", quantization=method, progress=False, **kw)
    with monkeypatch.context() as m:
        force_triton(m)
        r = cpu_runner(eng.model_config, eng.model_path, eng.config, block_size=eng.config.block_size,
                       max_model_len=eng.max_model_len, eos_token_ids=eng.tokenizer.eos_token_ids,
                       quantization=method)
    r.allocate_kv_cache(eng.block_manager.num_blocks)
    eng.runner = r
    return ref, eng


@pytest.mark.parametrize("arch,method", [("qwen2", "eetq"), ("llama", "int4"), ("qwen2", "awq"),
                                         ("qwen2", "bnb-nf4"), ("llama", "bnb-int8")])
def test_quantized_cuda_runner_matches_cpu_runner(folders, awq_folder, arch, method, monkeypatch):
    from llmcore.quantization.awq import Int4Linear
    from llmcore.quantization.int8 import Int8Embedding, Int8Linear
    from llmcore_cuda.runner import EAGER_QUANTIZATION

    if method.startswith("bnb"):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    folder = awq_folder if method == "awq" else folders[arch]
    ref, eng = engines(folder, method, monkeypatch, max_num_seqs=4, max_model_len=64,
                       extra={"cuda_graph_buckets": (1, 4)})
    fused = eng.runner.fused
    assert fused.quantized and not fused.pdl
    for L in fused.layers:
        for q in (L.qkv_q, L.o_q, L.gu_q, L.d_q):
            if method == "eetq":
                assert isinstance(q, Int8Linear) and q.kernel == "triton", q
            elif method in ("int4", "awq"):
                assert isinstance(q, Int4Linear) and q.kernel == "triton", q
            else:  # bitsandbytes' layers subclass nn.Linear but hold no float weight
                assert type(q).__name__ == {"bnb-nf4": "Linear4bit", "bnb-int8": "Linear8bitLt"}[method], q
    if method in ("eetq", "int4"):
        assert isinstance(fused.lm_q, Int8Linear) and fused.lm_q.kernel == "triton"
        # tied (qwen2): the embedding reads the output projection's int8 table, one copy
        assert isinstance(fused.embed_q, Int8Embedding) == (arch == "qwen2")
        if arch == "qwen2":
            assert fused.embed_q.weight is fused.lm_q.weight
    else:  # awq, bnb: embedding and output projection as stored (float)
        assert fused.lm_q is None and fused.embed_q is None
    prompts = [list(range(3, 23)), [11, 12, 13], list(range(100, 133)), [5]]
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, sp)]
    got = [o.outputs[0].token_ids for o in eng.generate(prompts, sp)]
    assert got == want
    st = eng.runner.stats
    if method in EAGER_QUANTIZATION:  # decode through the general forward, no graphs
        assert not eng.runner.graphs and st["graph_steps"] == 0 and st["eager_steps"] > 0, st
    else:
        assert eng.runner.graphs and st["graph_steps"] > 0 and st["eager_steps"] > 0, st
    # batch 1 (the GEMV path) on its own
    one = [o.outputs[0].token_ids for o in eng.generate([prompts[1]], sp)]
    assert one == want[1:2]
