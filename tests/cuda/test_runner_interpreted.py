"""The CUDA runner's host logic (graph buckets, padding, overlapped decode, chunked
prefill, prefix hits) on the CPU through Triton's interpreter, against the core
CPU runner, at sizes CI runs in about a minute (``TRITON_INTERPRET=1``); on a GPU
the same paths are covered by test_gpu_engine.py.
"""

from __future__ import annotations

import pytest

from llmcore import Engine, SamplingParams
from tests.conftest import interpreted_only

pytestmark = interpreted_only


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("triton")
    from llmcore_cuda.testing import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("m") / "tiny", vocab_size=512, hidden_size=64,
                             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2)


def engines(folder, **kw):
    from llmcore_cuda.testing import cpu_runner  # imports triton (optional)

    ref = Engine(model=str(folder), device="cpu", dtype="float32", progress=False, **kw)
    eng = Engine(model=str(folder), device="cpu", dtype="float32", progress=False, **kw)
    r = cpu_runner(eng.model_config, eng.model_path, eng.config, block_size=eng.config.block_size,
                   max_model_len=eng.max_model_len, eos_token_ids=eng.tokenizer.eos_token_ids)
    r.allocate_kv_cache(eng.block_manager.num_blocks)
    eng.runner = r
    return ref, eng


def test_greedy_matches_cpu_runner(folder, monkeypatch):
    from llmcore_cuda import runner  # imports triton (optional)

    monkeypatch.setattr(runner, "MIN_MIXED_DECODES", 1)  # mixed steps: decodes via the decode kernel

    ref, eng = engines(folder, max_num_seqs=4, max_num_batched_tokens=24, max_model_len=64,
                       extra={"cuda_graph_buckets": (1, 2, 4)})
    base = list(range(3, 40))
    # 6 requests, 4 slots: chunked prefills (33 > 24 tokens), mixed steps, padded buckets (3 of 4)
    prompts = [base[:20], base[:20] + [7, 8, 9], [11, 12, 13], base[:33], list(range(100, 117)), [5]]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, sp)]
    got = [o.outputs[0].token_ids for o in eng.generate(prompts, sp)]
    assert got == want
    st = eng.runner.stats
    assert st["graph_steps"] > 0 and st["eager_steps"] > 0
    assert st["overlap_hits"] > 0
    # again: prefix-cache hits on a cached prompt's blocks (and on one's own)
    got2 = [o.outputs[0].token_ids for o in eng.generate(prompts[:2], sp)]
    assert got2 == want[:2]
    assert eng.stats()["prefix_cache_hit_tokens"] > 0


def test_single_stream_overlap_and_sampling(folder):
    ref, eng = engines(folder, max_num_seqs=2, max_model_len=64, extra={"cuda_graph_buckets": (1, 2)})
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    p = list(range(20, 29))  # 9 + 20 tokens: crosses the block boundary at 16
    assert eng.generate([p], sp)[0].outputs[0].token_ids == ref.generate([p], sp)[0].outputs[0].token_ids
    st = eng.runner.stats
    # every step but the block-boundary crossing and the first two runs from the overlap
    assert st["overlap_hits"] >= 15, st
    # non-greedy sampling goes through the graph's logits and the core sampler
    sp2 = SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=2)
    a = eng.generate([p, p[:4]], sp2)
    b = ref.generate([p, p[:4]], sp2)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_eager_mode_and_prompt_logprobs(folder):
    ref, eng = engines(folder, max_num_seqs=4, max_model_len=64, enforce_eager=True)
    assert not eng.runner.graphs
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=1)
    prompts = [list(range(30, 50)), [9, 8, 7]]
    a = eng.generate(prompts, sp)
    b = ref.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    for x, y in zip(a, b):
        for dx, dy in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:]):
            for t in dy:
                assert abs(dx[t].logprob - dy[t].logprob) < 1e-4


def test_eager_kernel_arguments_keep_one_specialization(folder, monkeypatch):
    """Triton compiles a kernel once per specialization: whether each pointer is 16-byte aligned
    and whether each integer is 1 or divisible by 16. The eager steps' metadata (staged views,
    block-table rows) must not change those step to step, or a workload compiles new variants
    mid-run that no start-up warm-up can cover (issue #15: ~9 s of JIT on an H100)."""
    import torch

    from llmcore_cuda import kernels, runner

    monkeypatch.setattr(runner, "MIN_MIXED_DECODES", 1)
    seen = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.numel()]
            seen.append((name, tuple(t.data_ptr() % 16 for t in tensors)))
            bt = kwargs.get("block_tables", args[3] if name != "rope_and_cache" else None)
            if bt is not None:
                seen.append((name + ".block_tables", bt.stride(0) % 16))
            return fn(*args, **kwargs)
        return wrapper

    for name in ("prefill_attention", "decode_attention", "rope_and_cache"):
        monkeypatch.setattr(kernels, name, recording(name, getattr(kernels, name)))
    _, eng = engines(folder, max_num_seqs=4, max_num_batched_tokens=23, max_model_len=64,
                     extra={"cuda_graph_buckets": (1, 2)})
    prompts = [list(range(3, 3 + k)) for k in (5, 30, 9, 17, 2, 41, 13)]  # odd lengths: odd offsets
    eng.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert {n for n, _ in seen} >= {"prefill_attention", "decode_attention", "rope_and_cache"}
    bad = sorted({(n, v) for n, v in seen if (v if isinstance(v, int) else any(v))})
    assert not bad, f"misaligned kernel arguments (name, offsets mod 16): {bad}"
