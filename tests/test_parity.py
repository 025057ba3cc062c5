"""Greedy output equals Hugging Face transformers' token for token (float32).

Requests join the running batch at different steps, so the batched, paged and
chunked paths are all compared against transformers running each prompt alone.
"""

from __future__ import annotations

import pytest

from llmcore import Engine, SamplingParams
from llmcore_cpu import native, toolchain
from tests.conftest import hf_greedy

# prompts whose greedy continuations have no near-ties in float32
SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
]


def run_staggered(engine: Engine, prompts, max_tokens: int, join_every: int = 2):
    """Add one request every ``join_every`` steps; return outputs by prompt index."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending = list(enumerate(prompts))
    rid_to_idx, done = {}, {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % join_every == 0:
            i, p = pending.pop(0)
            rid_to_idx[engine.add_request(p, params)] = i
        for out in engine.step():
            if out.finished:
                done[rid_to_idx[out.request_id]] = out
        step += 1
    return [done[i] for i in range(len(prompts))]


def test_smollm2_greedy_matches_transformers_with_staggered_joins(smol_engine, smollm_dir):
    outs = run_staggered(smol_engine, SMOL_PROMPTS, max_tokens=24)
    for prompt, out in zip(SMOL_PROMPTS, outs):
        ref = hf_greedy(smollm_dir, out.prompt_token_ids, 24)
        assert out.outputs[0].token_ids == ref, prompt


@pytest.mark.parametrize("native_decode", [True, False], ids=["native-decode", "torch-decode"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_random_models_match_transformers(fixture, native_decode, request, monkeypatch):
    """Through the CPU plugin's native decode step (its portable kernels where the CPU has no
    AVX-512, which the engine would otherwise not use) and through the torch path."""
    model_dir = request.getfixturevalue(fixture)
    if native_decode:
        try:
            native.library()
        except native.NativeUnavailable as exc:  # no C++ compiler here
            pytest.skip(f"native step unavailable: {exc}")
        monkeypatch.setenv(toolchain.ENV, "1")
    engine = Engine(model=str(model_dir), device="cpu", dtype="float32", progress=False,
                    num_kv_blocks=64, block_size=16, max_num_batched_tokens=32, native_decode=native_decode)
    # lengths straddle block boundaries; the 40-token prompt is prefilled in chunks of <= 32
    prompts = [list(range(100, 100 + n)) for n in (3, 16, 17, 40, 9)]
    outs = run_staggered(engine, prompts, max_tokens=20, join_every=3)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, 20), f"prompt of {len(prompt)}"
    assert engine.stats()["kv_blocks_used"] == 0
    step = engine.runner.decode_graph
    if native_decode:  # the decode-only steps ran natively (mixed prefill steps take the torch path)
        assert isinstance(step, native.NativeDecode) and step.calls >= 10, step
    else:
        assert step is None, f"native_decode=False still installed {step!r}"


def test_chat_template_greedy(smol_engine):
    out = smol_engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=20, temperature=0))
    assert out[0].outputs[0].text == "The capital of France is Paris."
    assert out[0].outputs[0].finish_reason == "stop"
