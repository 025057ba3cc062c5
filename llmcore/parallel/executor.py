"""Tensor parallelism over processes on one host: one process per rank, rank 0 is the engine's.

:class:`TensorParallelRunner` is what the engine holds as its runner when
``tensor_parallel_size > 1``. It starts ``N - 1`` worker processes (``multiprocessing``
spawn), joins them in a ``torch.distributed`` group (NCCL on CUDA with rank ``r`` on
``cuda:r``; gloo on the CPU), and every rank builds its runner through the device's normal
``create_runner`` while :func:`llmcore.parallel.tensor_parallel.activate` is in effect, so the
runner loads only its shard. Then, every engine step::

    rank 0                                   rank r > 0 (worker)
    Scheduler.schedule() -> batch
    pickle once, send to each worker pipe -> recv batch
    runner.execute(batch)                    runner.execute(batch)
      forward: 2 all-reduces per layer  <-->   same forward, same all-reduces
      logits (replicated lm_head), sample      logits; its sampler is a no-op
    return its SampleResults                 wait for the next message

Set-up calls that every rank must make (allocate the KV cache and capture CUDA graphs,
measure the KV budget, embed) are sent the same way and answered over the pipe; the KV budget
is the smallest over the ranks.

The pieces: this module is rank 0 (the supervisor); :mod:`llmcore.parallel.worker` is the
loop every other rank runs; :mod:`llmcore.parallel.wire` is the per-step message format.

Failures: a worker that raises sends its traceback and exits; one that dies closes its pipe.
Rank 0 notices at once (gloo fails the pending collective; on NCCL a watchdog thread aborts
the process group so rank 0 stops waiting on the GPU) and raises
:class:`TensorParallelError` with the worker's traceback; nothing waits forever. Workers
exit when told to, when rank 0's process goes away (a pipe EOF, and a parent-pid check every
second) and at interpreter exit. Every process gets ``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1`` (NVLink multicast off).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from llmcore.errors import LlmcoreError
from llmcore.parallel.tensor_parallel import TPGroup
from llmcore.parallel.validate import validate_tensor_parallel
from llmcore.parallel.wire import BatchEncoder
from llmcore.parallel.worker import (
    NO_MULTICAST_ENV, OPS, STOP_TIMEOUT_S, WorkerSpec, destroy_group, quiet, release_runner, worker_main,
)

log = logging.getLogger("llmcore.parallel")

DEFAULT_TIMEOUT_S = 300.0  # a collective or a set-up answer slower than this is a failure


class TensorParallelError(LlmcoreError):
    """A rank of a tensor-parallel group failed; the message carries its traceback."""


def _stop_processes(procs: list, conns: list, grace: float) -> None:
    """Stop worker processes: wait ``grace`` s for them to exit, then terminate, then kill."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.05))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)
    for c in conns:
        try:
            c.close()
        except Exception:
            pass


def _finalize(procs: list, conns: list, stopping: threading.Event, wake) -> None:
    """Interpreter exit or garbage collection without shutdown(): the workers must not stay."""
    stopping.set()
    try:
        wake.send(None)
    except Exception:
        pass
    for c in conns:
        try:
            c.send_bytes(pickle.dumps(("stop",)))
        except Exception:
            pass
    _stop_processes(procs, conns, grace=5.0)


_OWNER: weakref.ref | None = None  # the runner that initialized this process's default group
_OWNER_BACKEND = [""]


def _set_owner(runner: Any) -> None:
    global _OWNER
    _OWNER = weakref.ref(runner)
    _OWNER_BACKEND[0] = runner.backend


class TensorParallelRunner:
    """Rank 0 of a tensor-parallel group; the engine's ``ModelRunner``.

    Attributes it does not define (``stats``, ``model``, ``graphs``, ...) read rank 0's runner.
    ``extra`` options: ``tp_timeout_s`` (default 300: collectives and set-up answers),
    ``tp_worker_hook`` (a picklable ``hook(rank, op)`` each worker calls before each op).
    """

    def __init__(self, device: Any, model_config: Any, folder: Path, dtype: str, eos_token_ids: list[int],
                 max_model_len: int) -> None:
        cfg = device.config
        n = cfg.tensor_parallel_size
        validate_tensor_parallel(n, model_config, device, quantization=cfg.quantization)
        if dist.is_initialized() and _OWNER is not None and _OWNER() is None:
            # left by an engine that was dropped without shutdown(): its workers are gone
            destroy_group(_OWNER_BACKEND[0], healthy=False)
        if dist.is_initialized():
            raise TensorParallelError(
                "torch.distributed is already initialized in this process (another tensor-parallel "
                "engine is running here, or the caller set it up); shut that engine down first "
                "(Engine.shutdown()), or run this engine in its own process")
        os.environ.update(NO_MULTICAST_ENV)
        extra = cfg.extra or {}
        self.world_size = n
        self.backend = device.tensor_parallel_backend
        self.timeout_s = float(extra.get("tp_timeout_s", DEFAULT_TIMEOUT_S))
        self.runner: Any = None
        self._procs: list = []
        self._conns: list = []
        self._closed = False
        self._broken: str | None = None
        self._died: tuple[int, int | None] | None = None
        self._errors: dict[int, Any] = {}  # worker index -> ("error", rank, op, traceback)
        self._encoder = BatchEncoder()
        self._threads_before = torch.get_num_threads()
        threads = None
        if self.backend == "gloo":  # ranks share the CPU: split the thread budget
            threads = max(1, (cfg.num_threads or os.cpu_count() or 1) // n)
        self.threads_per_rank = threads
        store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=self.timeout_s))
        self._store = store
        worker_device = _copy_device(device)
        spec = WorkerSpec(worker_device, model_config, str(folder), dtype, list(eos_token_ids), max_model_len,
                          n, self.backend, store.port, self.timeout_s, threads, os.getpid(),
                          extra.get("tp_worker_hook"))
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._stopping = threading.Event()
        self._finalizer = weakref.finalize(self, _finalize, self._procs, self._conns, self._stopping, self._wake_w)
        t0 = time.perf_counter()
        try:
            ctx = mp.get_context("spawn")
            for r in range(1, n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=worker_main, args=(spec, r, child), name=f"llmcore-tp-rank{r}",
                                daemon=True)
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
            self._watchdog = threading.Thread(target=_watch, args=(weakref.ref(self), self._procs, self._wake_r,
                                                                   self._stopping), daemon=True,
                                              name="llmcore-tp-watchdog")
            self._watchdog.start()
            self.worker_pids = self._gather("start", timeout=self.timeout_s)
            if self.backend == "nccl":
                torch.cuda.set_device(0)
            dist.init_process_group(self.backend, store=store, rank=0, world_size=n,
                                    timeout=timedelta(seconds=self.timeout_s))
            _set_owner(self)
            try:
                self.runner = device.create_runner(model_config, folder, dtype, eos_token_ids, max_model_len,
                                                   tp=TPGroup(0, n))
            except Exception as exc:
                raise self._fail("rank 0 failed to load its shard", exc) from exc
            if threads:
                torch.set_num_threads(threads)
            sizes = self._gather("load", timeout=None)  # no deadline: big checkpoints load slowly
            mine = self.runner.kv_bytes_per_block()
            if any(s != mine for s in sizes):
                raise self._fail(f"ranks disagree on the KV block size: {[mine, *sizes]}")
            total, _ = self._call("warmup")
            if int(total) != n:
                raise self._fail(f"all-reduce check gave {total}, expected {n}")
        except BaseException:
            self.shutdown()
            raise
        if hasattr(self.runner, "profile_kv_budget"):
            self.profile_kv_budget = self._profile_kv_budget
        log.info("tensor parallel: %d ranks (%s, worker pids %s), ready in %.1f s", n, self.backend,
                 self.worker_pids, time.perf_counter() - t0)

    # ------------------------------------------------------------------ protocol

    def __getattr__(self, name: str) -> Any:
        runner = self.__dict__.get("runner")
        if runner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(runner, name)

    def kv_bytes_per_block(self) -> int:
        """Bytes of one KV block on one rank (each rank caches its own KV heads)."""
        return self.runner.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._call("allocate_kv_cache", num_blocks)

    def _profile_kv_budget(self, utilization: float) -> int:
        mine, theirs = self._call("profile_kv_budget", utilization)
        return min([mine, *theirs])

    def set_num_threads(self, n: int) -> None:
        """``n`` threads in all: each rank gets ``n // world_size`` (at least 1)."""
        self._call("set_num_threads", max(1, int(n) // self.world_size))

    def embed(self, token_ids):
        mine, _ = self._call("embed", list(token_ids))
        return mine

    def execute(self, batch):
        self._check()
        data = pickle.dumps(self._encoder.encode(batch), protocol=pickle.HIGHEST_PROTOCOL)
        self._send(data, "execute")
        try:
            out = self.runner.execute(batch)
        except Exception as exc:
            raise self._fail("rank 0 failed in execute", exc) from exc
        except BaseException:
            self._abandon("interrupted during execute")
            raise
        if self._died is not None or any(c.poll() for c in self._conns):
            raise self._fail("a worker failed during execute")
        return out

    def worker_attr(self, name: str) -> list[Any]:
        """``name`` of every rank's runner, rank 0 first (e.g. ``"stats"``: same decisions?)."""
        mine, theirs = self._call("getattr", name)
        return [mine, *theirs]

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Stop the workers and leave the process group; idempotent. The runner is unusable after."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        healthy = self._broken is None and self._died is None and all(p.is_alive() for p in self._procs)
        try:
            self._wake_w.send(None)
        except Exception:
            pass
        if healthy:
            for c in self._conns:
                try:
                    c.send_bytes(pickle.dumps(("stop",)))
                except Exception:
                    healthy = False
        runner, self.runner = self.runner, None
        release_runner(runner)
        del runner
        gc.collect()
        destroy_group(self.backend, healthy)
        _stop_processes(self._procs, self._conns, grace=STOP_TIMEOUT_S if healthy else 2.0)
        self._finalizer.detach()
        self._store = None
        if self.threads_per_rank:
            torch.set_num_threads(self._threads_before)
        log.info("tensor parallel: workers stopped")

    close = shutdown

    # ------------------------------------------------------------------ internals

    def _check(self) -> None:
        if self._broken is not None:
            raise TensorParallelError(f"the tensor-parallel group is down: {self._broken}")
        if self._closed:
            raise TensorParallelError("the tensor-parallel runner was shut down")
        if self._died is not None or any(not p.is_alive() for p in self._procs):
            raise self._fail("a worker exited")

    def _send(self, data: bytes, what: str) -> None:
        for c in self._conns:
            try:
                c.send_bytes(data)
            except (BrokenPipeError, ConnectionError, OSError) as exc:
                raise self._fail(f"could not send {what} to a worker", exc) from exc

    def _call(self, op: str, *args: Any) -> tuple[Any, list[Any]]:
        """Run set-up op ``op`` on every rank; returns (rank 0's result, the workers' results)."""
        self._check()
        self._send(pickle.dumps(("call", op, args), protocol=pickle.HIGHEST_PROTOCOL), op)
        try:
            mine = OPS[op](self.runner, *args)
        except Exception as exc:
            raise self._fail(f"rank 0 failed in {op}", exc) from exc
        except BaseException:
            self._abandon(f"interrupted during {op}")
            raise
        return mine, self._gather(op, timeout=self.timeout_s)

    def _gather(self, what: str, timeout: float | None) -> list[Any]:
        """Each worker's answer to ``what``; a worker that dies, fails or stays silent is an error."""
        results: list[Any] = [None] * len(self._conns)
        pending = set(range(len(self._conns)))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            waitables = [self._conns[i] for i in pending] + [self._procs[i].sentinel for i in pending]
            ready = mpc.wait(waitables, timeout=left)
            if not ready:
                ranks = ", ".join(str(i + 1) for i in sorted(pending))
                raise self._fail(f"rank(s) {ranks} did not answer {what} within {timeout:.0f} s "
                                 "(extra['tp_timeout_s'] sets the limit)")
            for i in sorted(pending):
                c, p = self._conns[i], self._procs[i]
                if c.poll():
                    try:
                        msg = c.recv()
                    except (EOFError, OSError):
                        raise self._fail(f"rank {i + 1} closed its pipe during {what}") from None
                    if msg[0] == "error":
                        self._errors[i] = msg
                        raise self._fail(f"rank {i + 1} failed in {what}")
                    results[i] = msg[1]
                    pending.discard(i)
                elif p.sentinel in ready:
                    p.join(1.0)
                    if not c.poll():
                        raise self._fail(f"rank {i + 1} exited with code {p.exitcode} during {what}")
        return results

    def _collect_errors(self, wait: float) -> str:
        """Tracebacks and exit codes of the workers (waits up to ``wait`` s for them to report)."""
        errors = self._errors
        deadline = time.monotonic() + wait
        while True:
            for i, (c, p) in enumerate(zip(self._conns, self._procs)):
                if i in errors:
                    continue
                try:
                    while c.poll():
                        msg = c.recv()
                        if msg[0] == "error":
                            errors[i] = msg
                            break
                except (EOFError, OSError):
                    pass
            silent_alive = [i for i, p in enumerate(self._procs) if i not in errors and p.is_alive()]
            if not silent_alive or time.monotonic() >= deadline or errors:
                break
            time.sleep(0.05)
        parts = []
        for i, p in enumerate(self._procs):
            if i in errors:
                _, rank, op, tb = errors[i]
                parts.append(f"rank {rank} failed in {op}:\n{tb.rstrip()}")
            elif not p.is_alive():
                parts.append(f"rank {i + 1} exited with code {p.exitcode}")
        return "\n".join(parts)

    def _fail(self, reason: str, cause: BaseException | None = None) -> TensorParallelError:
        """Record the failure, stop everything, and return the error to raise."""
        details = self._collect_errors(wait=3.0 if cause is not None else 1.0)
        msg = f"tensor parallel ({self.world_size} ranks, {self.backend}): {reason}"
        if cause is not None:
            msg += f" ({type(cause).__name__}: {cause})"
        if details:
            msg += "\n" + details
        if self._broken is None:
            self._broken = msg
            log.error("%s", msg)
        self.shutdown()
        return TensorParallelError(msg)

    def _abandon(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        self.shutdown()



def _watch(ref: weakref.ref, procs: list, wake, stopping: threading.Event) -> None:
    """A worker that dies mid-step must not leave rank 0 waiting on the GPU forever.

    Holds the runner only weakly (a dropped engine must still be collected and finalized).
    """
    sentinels = {p.sentinel: i for i, p in enumerate(procs)}
    try:
        ready = mpc.wait(list(sentinels) + [wake])
    except Exception:
        return
    me = ref()
    if stopping.is_set() or me is None or me._closed:
        return
    for s in ready:
        if s in sentinels:
            i = sentinels[s]
            procs[i].join(0.5)
            me._died = (i + 1, procs[i].exitcode)
    if me._died is None:
        return
    log.error("tensor-parallel rank %d exited (code %s); failing the group", *me._died)
    if me.backend == "nccl":  # unblock rank 0 if it waits on a collective that will never finish
        quiet(c10d._abort_process_group)()


def _copy_device(device: Any) -> Any:
    """The device as workers get it: same settings, progress bars off (rank 0 shows them)."""
    dev = copy.copy(device)
    cfg = getattr(device, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        dev.config = dataclasses.replace(cfg, progress=False)
    return dev
