"""The CUDA runner's overlapped launch (placeholders filled on the device, host-sampled steps,
rows moving as sequences finish) against its synchronous execute(), on the CPU through Triton's
interpreter. Runs only with ``TRITON_INTERPRET=1`` (slow); on a GPU test_gpu_engine.py covers it.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="development test: needs TRITON_INTERPRET=1"
)


def test_launch_matches_execute(tmp_path):
    pytest.importorskip("triton")
    from llmcore import SamplingParams
    from llmcore.engine.engine import Engine
    from llmcore_cuda.runner import CudaModelRunner
    from llmcore_cuda.testing import make_model_folder

    # one layer, one KV head, max_model_len 64 (decode splits 2, not 8): fewer interpreted kernel
    # programs; the launch logic under test is per step, not per layer, head or KV slice
    # (test_runner_interpreted.py runs two layers and two KV heads through the same runner)
    folder = make_model_folder(tmp_path / "tiny", vocab_size=512, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=1)

    def engine(overlap: bool):
        eng = Engine(model=str(folder), device="cpu", dtype="float32", progress=False, max_num_seqs=4,
                     max_num_batched_tokens=24, max_model_len=64, extra={"cuda_graph_buckets": (1, 2, 4)})
        r = CudaModelRunner(eng.model_config, eng.model_path, torch.device("cpu"), "float32",
                            block_size=eng.config.block_size, max_model_len=eng.max_model_len,
                            eos_token_ids=eng.tokenizer.eos_token_ids, engine_config=eng.config, progress=False)
        r.allocate_kv_cache(eng.block_manager.num_blocks)
        eng.runner = r
        eng._launch = r.launch if overlap else None
        return eng

    # 6 requests, 4 slots: chunked prefills (26 > 24 tokens), rows finishing at different steps
    prompts = [list(range(3, 3 + k)) for k in (5, 26, 9, 13, 2, 19)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (5, 8, 3, 11, 6, 4)]
    params[2] = SamplingParams(max_tokens=6, temperature=0.9, seed=1, ignore_eos=True)  # host-sampled
    runs = []
    for overlap in (False, True):
        eng = engine(overlap)
        runs.append([o.outputs[0].token_ids for o in eng.generate(prompts, params)])
        assert eng.stats()["kv_blocks_used"] == 0
    assert runs[0] == runs[1]
