"""The worker side of a tensor-parallel group: one process per rank ``r > 0``.

A worker joins the ``torch.distributed`` group, builds its rank's runner through the device's
``create_runner(..., tp=group)``, and then serves rank 0's messages over its pipe until told to
stop: ``execute`` (a step: the same forward as rank 0, its samples unused), ``call`` (a set-up op
every rank must run, answered over the pipe) and ``stop``. A worker that raises sends its
traceback and exits; one whose rank 0 is gone exits on its own (pipe EOF, parent-pid check).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from tqdm import tqdm

from llmcore.contract import SampleResult
from llmcore.parallel.tensor_parallel import TPGroup
from llmcore.parallel.wire import BatchDecoder

log = logging.getLogger("llmcore.parallel")

#: set in every process of a tensor-parallel group, before torch.distributed starts
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STOP_TIMEOUT_S = 30.0
TRACEBACK_CHARS = 30_000


@dataclasses.dataclass
class WorkerSpec:
    """What a worker needs to build its rank (pickled once, at spawn)."""

    device: Any  # the engine's Device (its class is importable in the worker)
    model_config: Any
    folder: str
    dtype: str
    eos_token_ids: list[int]
    max_model_len: int
    world_size: int
    backend: str
    port: int
    timeout_s: float
    threads: int | None  # torch threads per rank (CPU)
    parent_pid: int
    # called as ``hook(rank, op)`` before each op a worker runs (``extra["tp_worker_hook"]``, a
    # picklable callable): observers and the tests' fault injection (tests/parallel/faults.py)
    hook: Callable[[int, str], None] | None = None


def _init_group(spec: WorkerSpec, rank: int) -> None:
    if spec.backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", spec.port, spec.world_size, is_master=False,
                          timeout=timedelta(seconds=spec.timeout_s))
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world_size,
                            timeout=timedelta(seconds=spec.timeout_s))


def _build(spec: WorkerSpec, rank: int, device: Any):
    runner = device.create_runner(spec.model_config, Path(spec.folder), spec.dtype,
                                  list(spec.eos_token_ids), spec.max_model_len,
                                  tp=TPGroup(rank, spec.world_size))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    return runner


class NullSampler:
    """Workers compute the same logits as rank 0; only rank 0's samples are used."""

    def release(self, keys) -> None:
        pass

    def __call__(self, logits, entries):
        return [SampleResult(token_ids=[0] * e.num_samples) for e in entries]


def _op_warmup(runner) -> float:
    t = torch.ones(1, dtype=torch.float32, device=runner.device)
    TPGroup(0, 0).all_reduce(t)  # the default group: creates the NCCL communicator before any graph capture
    return float(t.item())


def _op_embed(runner, token_ids):
    return runner.embed(token_ids)


def _op_set_num_threads(runner, n: int) -> None:
    if hasattr(runner, "set_num_threads"):
        runner.set_num_threads(n)
    else:
        torch.set_num_threads(n)


def _op_getattr(runner, name: str):
    value = getattr(runner, name, None)
    return dict(value) if isinstance(value, dict) else value


OPS = {
    "warmup": _op_warmup,
    "allocate_kv_cache": lambda runner, n: runner.allocate_kv_cache(n),
    "profile_kv_budget": lambda runner, u: runner.profile_kv_budget(u),
    "set_num_threads": _op_set_num_threads,
    "embed": _op_embed,
    "getattr": _op_getattr,
}


def release_runner(runner: Any) -> None:
    """Drop CUDA graphs first: NCCL's teardown waits while a graph that captured it is alive."""
    if runner is None:
        return
    graphs = getattr(runner, "graphs", None)
    if isinstance(graphs, dict):
        graphs.clear()
    if hasattr(runner, "_pending"):
        runner._pending = None


def destroy_group(backend: str, healthy: bool, timeout: float = STOP_TIMEOUT_S) -> None:
    """Leave the process group without ever blocking for long (abort when it would)."""
    if not dist.is_initialized():
        return
    if healthy:
        if backend == "nccl":
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
        t = threading.Thread(target=quiet(dist.destroy_process_group), daemon=True)
        t.start()
        t.join(timeout)
        if not t.is_alive():
            return
        log.warning("torch.distributed did not shut down within %.0f s; aborting the group", timeout)
    if backend == "nccl":
        quiet(c10d._abort_process_group)()  # also forgets the default group
    else:
        quiet(dist.destroy_process_group)()


def quiet(fn):
    def run(*a):
        try:
            fn(*a)
        except Exception as exc:  # best effort while shutting down
            log.debug("%s: %s", getattr(fn, "__name__", fn), exc)
    return run


# ------------------------------------------------------------------------------ worker


def _orphan_guard(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)  # rank 0's process is gone: nobody will ever talk to us again


def _before(spec: WorkerSpec, rank: int, op: str) -> None:
    if spec.hook is not None:
        spec.hook(rank, op)


def worker_main(spec: WorkerSpec, rank: int, conn) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    os.environ.setdefault("TQDM_DISABLE", "1")  # rank 0 shows the progress bars
    if spec.threads:
        os.environ["OMP_NUM_THREADS"] = str(spec.threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to rank 0, which stops us
    tqdm.set_lock(threading.RLock())  # its default multiprocessing semaphore would leak at os._exit
    threading.Thread(target=_orphan_guard, args=(spec.parent_pid,), daemon=True, name="orphan-guard").start()
    state = {"op": "start"}
    code = 0
    try:
        conn.send(("ok", os.getpid()))
        _init_group(spec, rank)
        state["op"] = "load"
        _before(spec, rank, "load")
        runner = _build(spec, rank, spec.device)
        runner.sampler = NullSampler()
        conn.send(("ok", runner.kv_bytes_per_block()))
        _serve(spec, rank, conn, runner, state)
    except BaseException:
        code = 1
        tb = traceback.format_exc()
        if len(tb) > TRACEBACK_CHARS:
            tb = "...\n" + tb[-TRACEBACK_CHARS:]
        try:
            conn.send(("error", rank, state["op"], tb))
        except Exception:
            pass
        print(f"llmcore tensor-parallel rank {rank} failed in {state['op']}:\n{tb}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: NCCL/CUDA state needs none, and it can hang


def _serve(spec: WorkerSpec, rank: int, conn, runner, state: dict) -> None:
    decoder = BatchDecoder()
    while True:
        state["op"] = "idle"
        try:
            msg = pickle.loads(conn.recv_bytes())
        except EOFError:
            return  # rank 0 is gone
        kind = msg[0]
        if kind == "execute":
            state["op"] = "execute"
            _before(spec, rank, "execute")
            runner.execute(decoder.decode(msg))
        elif kind == "call":
            op, args = msg[1], msg[2]
            state["op"] = op
            _before(spec, rank, op)
            result = OPS[op](runner, *args)
            conn.send(("ok", result if op in ("getattr", "profile_kv_budget", "warmup") else None))
        elif kind == "stop":
            state["op"] = "stop"
            release_runner(runner)
            runner = None
            gc.collect()
            destroy_group(spec.backend, healthy=True)
            conn.send(("ok", None))
            return
        else:
            raise RuntimeError(f"unknown message {kind!r}")
