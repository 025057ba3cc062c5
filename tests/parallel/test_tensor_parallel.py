"""Tensor parallelism on the CPU (gloo, 2 processes): the transform, end-to-end parity, failures.

The end-to-end tests compare ``tensor_parallel_size=2`` with ``tensor_parallel_size=1`` token for
token in float32 on small random Llama and Qwen2 models (Qwen2 has q/k/v biases), with requests
joining at different steps, prompts prefilled in chunks, a prefix-cache hit, parallel sampling
(copy-on-write blocks) and logprobs. GPU variants: tests/parallel/test_tensor_parallel_gpu.py.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from llmcore.capabilities import Capabilities
from llmcore.errors import ConfigError
from llmcore.models.config import ModelConfig
from llmcore.parallel.executor import TensorParallelError
from llmcore.parallel.tensor_parallel import TPGroup, apply_tensor_parallel, local_config
from llmcore.parallel.validate import tensor_parallel_sizes, validate_tensor_parallel
from llmcore.sampling_params import SamplingParams
from tests.parallel.faults import Fault

ENGINE_KW = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=128, max_num_seqs=8,
                 max_num_batched_tokens=32)


def _noop(t):
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _group_down() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized()


# ----------------------------------------------------------------------------- transform


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory):
    """Llama with every bias on (q/k/v/o and MLP): the row-parallel biases must be added once."""
    from llmcore.testing.models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("biased") / "m", arch="llama", seed=3,
                             attention_bias=True, mlp_bias=True, num_hidden_layers=1)


def _full_runner(folder, tp: TPGroup | None = None):
    from llmcore.runtime.attention import TorchPagedAttention
    from llmcore.runtime.runner import TorchModelRunner

    cfg = ModelConfig.from_path(folder)
    return TorchModelRunner(cfg, folder, torch.device("cpu"), "float32", TorchPagedAttention(), block_size=16,
                            max_model_len=64, eos_token_ids=[2], progress=False, tp=tp)


def _attn_inputs(model, t=9, seed=0):
    from llmcore.runtime.attention import AttentionMetadata

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(t, cfg.hidden_size, generator=g)
    pos = torch.arange(t)
    cos = model.rope_cos[pos].unsqueeze(1)
    sin = model.rope_sin[pos].unsqueeze(1)
    meta = AttentionMetadata(slot_mapping=pos, query_starts=[0], query_lens=[t], context_lens=[t],
                             block_tables=[[0]])
    shape = (1, 16, cfg.num_kv_heads, cfg.head_dim)
    kv = (torch.zeros(shape), torch.zeros(shape))
    return x, cos, sin, kv, meta


@pytest.mark.parametrize("which", ["biased_llama", "tiny_qwen2"])
def test_transform_shapes_biases_and_sums(which, request):
    folder = request.getfixturevalue(which)
    full = _full_runner(folder).model
    cfg = full.config
    d, n = cfg.head_dim, 2
    shards = [apply_tensor_parallel(copy.deepcopy(full), TPGroup(r, n, reduce_fn=_noop)) for r in range(n)]
    q, kv, inter = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    for r, m in enumerate(shards):
        assert m.config.num_heads == cfg.num_heads // n and m.config.num_kv_heads == cfg.num_kv_heads // n
        assert m.config.intermediate_size == inter // n and m.config.head_dim == d
        a, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
        assert (a.num_heads, a.num_kv_heads, a.q_size, a.kv_size) == (
            cfg.num_heads // n, cfg.num_kv_heads // n, q // n, kv // n)
        assert tuple(a.qkv_proj.weight.shape) == ((q + 2 * kv) // n, cfg.hidden_size)
        assert tuple(a.o_proj.weight.shape) == (cfg.hidden_size, q // n)
        assert tuple(mlp.gate_up_proj.weight.shape) == (2 * inter // n, cfg.hidden_size)
        assert tuple(mlp.down_proj.weight.shape) == (cfg.hidden_size, inter // n)
        assert mlp.intermediate == inter // n
        fa = full.model.layers[0].self_attn
        w = fa.qkv_proj.weight
        # q, k and v are sliced by heads separately, then re-concatenated
        want = torch.cat([w[r * q // n:(r + 1) * q // n], w[q + r * kv // n: q + (r + 1) * kv // n],
                          w[q + kv + r * kv // n: q + kv + (r + 1) * kv // n]])
        assert torch.equal(a.qkv_proj.weight, want)
        if cfg.qkv_bias:
            b = fa.qkv_proj.bias
            assert torch.equal(a.qkv_proj.bias, torch.cat([b[r * q // n:(r + 1) * q // n],
                                                           b[q + r * kv // n: q + (r + 1) * kv // n],
                                                           b[q + kv + r * kv // n: q + kv + (r + 1) * kv // n]]))
        # row-parallel biases live on rank 0 only: the all-reduce adds them once
        if cfg.o_bias:
            assert (a.o_proj.bias is not None) == (r == 0)
        if cfg.mlp_bias:
            assert (mlp.down_proj.bias is not None) == (r == 0)
            assert mlp.gate_up_proj.bias.shape[0] == 2 * inter // n
    # the ranks' partial outputs sum to the single-device output (layer 0, attention and MLP)
    from llmcore.runtime.attention import TorchPagedAttention

    backend = TorchPagedAttention()
    with torch.inference_mode():
        x, cos, sin, kv_full, meta = _attn_inputs(full)
        want_attn = full.model.layers[0].self_attn(x, cos, sin, kv_full, meta, backend)
        got_attn = sum(m.model.layers[0].self_attn(x, cos, sin, _attn_inputs(m)[3], meta, backend) for m in shards)
        torch.testing.assert_close(got_attn, want_attn, rtol=1e-5, atol=1e-5)
        want_mlp = full.model.layers[0].mlp(x)
        got_mlp = sum(m.model.layers[0].mlp(x) for m in shards)
        torch.testing.assert_close(got_mlp, want_mlp, rtol=1e-5, atol=1e-5)


def test_sharded_loading_equals_the_transform(tiny_qwen2):
    """The runner's loading hook (slice while reading) builds exactly the transform's shard."""
    full = _full_runner(tiny_qwen2).model
    for r in range(2):
        tp = TPGroup(r, 2, reduce_fn=_noop)
        loaded = _full_runner(tiny_qwen2, tp)
        assert loaded.config.num_kv_heads == full.config.num_kv_heads // 2  # the KV cache holds local heads
        assert loaded.kv_bytes_per_block() * 2 == _full_runner(tiny_qwen2).kv_bytes_per_block()
        want = apply_tensor_parallel(copy.deepcopy(full), TPGroup(r, 2, reduce_fn=_noop)).state_dict()
        got = loaded.model.state_dict()
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k


# ----------------------------------------------------------------------------- validation


def _model(heads=8, kv=4, inter=64):
    return ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=100, hidden_size=64,
                       intermediate_size=inter, num_layers=1, num_heads=heads, num_kv_heads=kv, head_dim=8)


def _device(name="cuda", backend="nccl", limit=8, **caps):
    return SimpleNamespace(name=name, capabilities=Capabilities(**caps), tensor_parallel_backend=backend,
                           tensor_parallel_limit=lambda: (limit, "GPUs (torch.cuda.device_count())"))


def test_validation_errors_name_option_value_and_what_works():
    validate_tensor_parallel(1, _model(), _device(backend=None))  # 1 always works
    validate_tensor_parallel(4, _model(), _device())
    assert tensor_parallel_sizes(_model(heads=12, kv=4, inter=96), 8) == [1, 2, 4]
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ConfigError, match="tensor_parallel_size.*integer >= 1"):
            validate_tensor_parallel(bad, _model(), _device())
    with pytest.raises(ConfigError) as e:
        validate_tensor_parallel(3, _model(heads=12, kv=4, inter=96), _device())
    msg = str(e.value)
    assert "tensor_parallel_size=3" in msg and "num_key_value_heads=4" in msg and "Use one of: 1, 2, 4" in msg
    assert "num_attention_heads" not in msg and "intermediate_size" not in msg
    with pytest.raises(ConfigError, match=r"intermediate_size=65.*Use one of: 1 \(with 8 GPUs here\)"):
        validate_tensor_parallel(2, _model(inter=65), _device())
    with pytest.raises(ConfigError, match=r"exceeds the 2 GPUs \(torch.cuda.device_count\(\)\).*Use one of: 1, 2"):
        validate_tensor_parallel(4, _model(), _device(limit=2))
    with pytest.raises(ConfigError, match="neuron shards a model in its compiled plan.*llmcore compile "
                                          "--device neuron --tensor-parallel 2"):
        validate_tensor_parallel(2, _model(), _device(name="neuron", needs_compile=True, static_shapes=True))
    with pytest.raises(ConfigError, match="'toy' does not support tensor parallelism"):
        validate_tensor_parallel(2, _model(), _device(name="toy", backend=None))
    with pytest.raises(ConfigError, match="quantization='int8'"):
        validate_tensor_parallel(2, _model(), _device(), quantization="int8")
    assert local_config(_model(), 4).num_heads == 2
    with pytest.raises(ConfigError):
        local_config(_model(kv=2), 4)


def test_engine_config_and_engine_refuse_before_loading(tiny_llama):
    from llmcore import Engine
    from llmcore.config import EngineConfig

    for bad in (0, "2", True):
        with pytest.raises(ConfigError, match="tensor_parallel_size"):
            EngineConfig(tensor_parallel_size=bad)
    before = multiprocessing.active_children()
    with pytest.raises(ConfigError, match="num_key_value_heads=2.*Use one of: 1, 2"):
        Engine(model=str(tiny_llama), tensor_parallel_size=4, **ENGINE_KW)  # 2 KV heads
    assert multiprocessing.active_children() == before and _group_down()


def test_compile_refuses_tensor_parallel_on_runtime_devices():
    from llmcore.compiled.plan import plan_static

    caps = Capabilities(dtypes=("float32",), tensor_parallel=True)
    with pytest.raises(ConfigError, match="cpu shards a model at run time.*--tensor-parallel 2"):
        plan_static(_model(), caps, "cpu", batch_size=1, max_seq_len=64, dtype="float32", tensor_parallel=2)
    static = Capabilities(dtypes=("float32",), tensor_parallel=True, needs_compile=True, static_shapes=True,
                          device_count=8)
    plan = plan_static(_model(), static, "neuron", batch_size=1, max_seq_len=64, dtype="float32",
                       tensor_parallel=2)
    assert plan.tensor_parallel == 2


# ----------------------------------------------------------------------------- end to end


def _requests(vocab_hi=4000):
    g = torch.Generator().manual_seed(7)
    long = torch.randint(3, vocab_hi, (40,), generator=g).tolist()  # prefilled in 2 chunks (budget 32)
    greedy = dict(temperature=0, ignore_eos=True)
    return [  # (step it joins, request id, prompt, params)
        (0, "a", torch.randint(3, vocab_hi, (7,), generator=g).tolist(), SamplingParams(max_tokens=14, **greedy)),
        (0, "b", long, SamplingParams(max_tokens=10, logprobs=2, prompt_logprobs=1, **greedy)),
        (2, "c", [11], SamplingParams(max_tokens=12, **greedy)),
        (3, "d", long[:33] + [5, 6], SamplingParams(max_tokens=9, **greedy)),  # prefix-cache hit
        (5, "e", torch.randint(3, vocab_hi, (20,), generator=g).tolist(),
         SamplingParams(max_tokens=8, n=2, temperature=0.8, seed=123, ignore_eos=True)),  # forks: COW blocks
        (9, "f", torch.randint(3, vocab_hi, (3,), generator=g).tolist(), SamplingParams(max_tokens=6, **greedy)),
    ]


def _run_staggered(engine):
    pending = _requests()
    done = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(prompt, params, request_id=rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 200
    return done


def _compare(got, want):
    assert sorted(got) == sorted(want)
    for rid in want:
        g, w = got[rid], want[rid]
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs], rid
        assert [o.finish_reason for o in g.outputs] == [o.finish_reason for o in w.outputs], rid
        for go, wo in zip(g.outputs, w.outputs):
            if wo.logprobs:
                for gl, wl in zip(go.logprobs, wo.logprobs):
                    assert sorted(gl) == sorted(wl)
                    for t in wl:
                        assert abs(gl[t].logprob - wl[t].logprob) < 1e-4
        if w.prompt_logprobs:
            assert len(g.prompt_logprobs) == len(w.prompt_logprobs)
            for gl, wl in zip(g.prompt_logprobs, w.prompt_logprobs):
                if wl is None:
                    continue
                for t in wl:
                    assert abs(gl[t].logprob - wl[t].logprob) < 1e-4
    assert got["d"].num_cached_tokens > 0


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_greedy_tp2_equals_tp1(which, request):
    from llmcore import Engine

    folder = str(request.getfixturevalue(which))
    with Engine(model=folder, **ENGINE_KW) as one:
        want = _run_staggered(one)
        emb1 = one.embed([5, 6, 7, 8])
    eng = Engine(model=folder, tensor_parallel_size=2, **ENGINE_KW)
    try:
        pids = list(eng.runner.worker_pids)
        assert len(pids) == 1 and _alive(pids[0])
        assert eng.runner.kv_bytes_per_block() * 2 == one.runner.kv_bytes_per_block()  # local KV heads
        assert eng.runner.threads_per_rank == max(1, (os.cpu_count() or 1) // 2)
        got = _run_staggered(eng)
        _compare(got, want)
        torch.testing.assert_close(torch.tensor(eng.embed([5, 6, 7, 8])), torch.tensor(emb1), rtol=1e-4, atol=1e-5)
        assert eng.stats()["num_preemptions"] == 0
    finally:
        eng.shutdown()
    assert _wait_dead(pids) == [] and _group_down()
    eng.shutdown()  # idempotent
    with pytest.raises(TensorParallelError, match="shut down"):
        eng.generate([1, 2, 3], SamplingParams(max_tokens=2))


# ----------------------------------------------------------------------------- failures


def test_worker_raising_mid_step_is_a_clear_error(tiny_llama):
    from llmcore import Engine

    eng = Engine(model=str(tiny_llama), tensor_parallel_size=2,
                 extra={"tp_worker_hook": Fault(op="execute", rank=1, at=3, kind="raise")}, **ENGINE_KW)
    pids = list(eng.runner.worker_pids)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError) as e:
        eng.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "rank 1 failed in execute" in msg and "Traceback" in msg and "injected fault" in msg
    assert _wait_dead(pids) == [] and _group_down()
    with pytest.raises(TensorParallelError, match="group is down"):
        eng.generate([1, 2, 3], SamplingParams(max_tokens=2))
    eng.shutdown()


def test_worker_killed_between_steps_is_a_clear_error(tiny_llama):
    from llmcore import Engine

    eng = Engine(model=str(tiny_llama), tensor_parallel_size=2, **ENGINE_KW)
    try:
        sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        assert len(eng.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids) == 4
        (pid,) = eng.runner.worker_pids
        os.kill(pid, signal.SIGKILL)
        assert _wait_dead([pid]) == []
        with pytest.raises(TensorParallelError, match="rank 1 exited.*-9"):
            eng.generate([[5, 6, 7]], sp)
    finally:
        eng.shutdown()
    assert _group_down() and multiprocessing.active_children() == []


def test_worker_failing_to_load_stops_the_engine_start(tiny_llama):
    from llmcore import Engine

    with pytest.raises(TensorParallelError, match="rank 1 failed in load(.|\n)*injected fault"):
        Engine(model=str(tiny_llama), tensor_parallel_size=2,
               extra={"tp_worker_hook": Fault(op="load", kind="raise")}, **ENGINE_KW)
    assert _group_down() and multiprocessing.active_children() == []


def test_workers_stop_when_the_engine_is_dropped_or_the_interpreter_exits(tiny_llama):
    from llmcore import Engine

    eng = Engine(model=str(tiny_llama), tensor_parallel_size=2, **ENGINE_KW)
    pids = list(eng.runner.worker_pids)
    del eng
    gc.collect()
    assert _wait_dead(pids) == []
    # the group the dropped engine left behind does not block the next one
    eng = Engine(model=str(tiny_llama), tensor_parallel_size=2, **ENGINE_KW)
    eng.shutdown()
    script = textwrap.dedent(f"""
        from llmcore import Engine
        if __name__ == "__main__":
            eng = Engine(model={str(tiny_llama)!r}, tensor_parallel_size=2, **{ENGINE_KW!r})
            print("PIDS", *eng.runner.worker_pids, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    pids = [int(p) for line in out.stdout.splitlines() if line.startswith("PIDS") for p in line.split()[1:]]
    assert pids and _wait_dead(pids, timeout=10) == []
