"""The CUDA runner's host logic (graph buckets, padding, overlapped decode, chunked
prefill, prefix hits) on the CPU through Triton's interpreter, against the core
CPU runner. Runs only with ``TRITON_INTERPRET=1`` (slow); on a GPU the same paths
are covered by test_gpu_engine.py.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="development test: needs TRITON_INTERPRET=1"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("triton")
    from llmcore_cuda.testing import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("m") / "tiny", vocab_size=512, hidden_size=64,
                             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2)


def engines(folder, **kw):
    from llmcore.engine.engine import Engine
    from llmcore_cuda.runner import CudaModelRunner

    ref = Engine(model=str(folder), device="cpu", dtype="float32", progress=False, **kw)
    eng = Engine(model=str(folder), device="cpu", dtype="float32", progress=False, **kw)
    r = CudaModelRunner(eng.model_config, eng.model_path, torch.device("cpu"), "float32",
                        block_size=eng.config.block_size, max_model_len=eng.max_model_len,
                        eos_token_ids=eng.tokenizer.eos_token_ids, engine_config=eng.config, progress=False)
    r.allocate_kv_cache(eng.block_manager.num_blocks)
    eng.runner = r
    return ref, eng


def test_greedy_matches_cpu_runner(folder, monkeypatch):
    from llmcore import SamplingParams
    from llmcore_cuda import runner

    monkeypatch.setattr(runner, "MIN_MIXED_DECODES", 1)  # mixed steps: decodes via the decode kernel

    ref, eng = engines(folder, max_num_seqs=4, max_num_batched_tokens=24, max_model_len=256,
                       extra={"cuda_graph_buckets": (1, 2, 4)})
    base = list(range(3, 40))
    prompts = [base[:20], base[:20] + [7, 8, 9], [11, 12, 13], base[:33], list(range(100, 117)), [5]]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, sp)]
    got = [o.outputs[0].token_ids for o in eng.generate(prompts, sp)]
    assert got == want
    st = eng.runner.stats
    assert st["graph_steps"] > 0 and st["eager_steps"] > 0
    assert st["overlap_hits"] > 0
    # second round: prefix-cache hits on the same prompts
    got2 = [o.outputs[0].token_ids for o in eng.generate(prompts, sp)]
    assert got2 == want
    assert eng.stats()["prefix_cache_hit_tokens"] > 0


def test_single_stream_overlap_and_sampling(folder):
    from llmcore import SamplingParams

    ref, eng = engines(folder, max_num_seqs=2, max_model_len=256, extra={"cuda_graph_buckets": (1, 2)})
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    p = list(range(20, 29))
    assert eng.generate([p], sp)[0].outputs[0].token_ids == ref.generate([p], sp)[0].outputs[0].token_ids
    st = eng.runner.stats
    # every step but the block-boundary crossings and the first runs from the overlap
    assert st["overlap_hits"] >= 30, st
    # non-greedy sampling goes through the graph's logits and the core sampler
    sp2 = SamplingParams(max_tokens=10, temperature=0.8, seed=3, logprobs=2)
    a = eng.generate([p, p[:4]], sp2)
    b = ref.generate([p, p[:4]], sp2)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_eager_mode_and_prompt_logprobs(folder):
    from llmcore import SamplingParams

    ref, eng = engines(folder, max_num_seqs=4, max_model_len=256, enforce_eager=True)
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
