# (about 480 lines: set-up, requests, the step loop and stats of one class; generate/stream/chat
# live in llmcore/engine/api.py, token handling in llmcore/engine/output.py)
"""The engine: requests in, tokens out, continuous batching over a paged KV cache.

``Engine`` is single-threaded; the server wraps it in a background thread
(``llmcore.engine.async_engine``). Each :meth:`step` asks the scheduler for a
batch and launches it on the device's runner. With a runner that offers
``launch`` (overlapped execution, :class:`llmcore.device.ModelRunner`) the step
launches batch n+1 *before* it reads batch n's tokens, then processes batch n's
outputs while the device computes: the device never waits for Python. Output
handling has two halves (:mod:`llmcore.engine.output`): the engine core records
tokens and token-level stops (KV blocks freed at once); the output side
detokenizes, checks stop strings and builds outputs, inline or on an output
thread (``output_thread``). A token sampled at step
n feeds step n+1 on the device (a placeholder in the scheduled batch); a
sequence found finished one step late has that extra token discarded, so the
outputs equal the synchronous loop's.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence as Seq

from llmcore.compiled.serve import explicit_settings, prepare_static
from llmcore.config import EngineConfig
from llmcore.contract import PLACEHOLDER_TOKEN, DoneStep, ScheduledBatch, StepHandle
from llmcore.engine.api import GenerateAPI
from llmcore.engine.block_manager import BlockManager
from llmcore.engine.output import Emitted, OutputProcessor, OutputWorker, StepOutputs
from llmcore.engine.scheduler import Scheduler
from llmcore.engine.sequence import Request, Sequence, SeqStatus
from llmcore.engine.structured import StructuredOutputs
from llmcore.errors import ConfigError, PluginError, RequestError
from llmcore.models.config import ModelConfig
from llmcore.models.loader import resolve_model
from llmcore.models.tokenizer import Tokenizer
from llmcore.outputs import RequestOutput
from llmcore.parallel.executor import TensorParallelRunner
from llmcore.plugins import get_registry
from llmcore.runtime.overlap import HostLaunch
from llmcore.sampling_params import SamplingParams
from llmcore.selection import probe_all, select_device, validate_against

log = logging.getLogger("llmcore.engine")

DEFAULT_CPU_KV_BYTES = 2 << 30


class Engine(GenerateAPI):
    """Load a model on a device and generate.

    >>> engine = Engine()                      # embedded SmolLM2, best device
    >>> out = engine.generate("Hello", SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].outputs[0].text
    """

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        *,
        plugins: Any = None,
        **kwargs: Any,
    ) -> None:
        self.config = cfg = EngineConfig(model=model, device=device, dtype=dtype, **kwargs)
        self.registry = plugins or get_registry()
        self.static = None
        if cfg.compiled is not None:
            # a compiled artifact's plan fixes device, dtype, model, slots and lengths;
            # explicit settings are checked against it (llmcore/compiled/serve.py)
            self.static = prepare_static(cfg, explicit_settings(model, device, dtype, kwargs))
            model, device = cfg.model, cfg.device
        reports = probe_all(self.registry, {"device": device})
        chosen = select_device(self.registry, reports, device)
        self.probe = chosen.probe
        self.dtype = validate_against(cfg, self.probe, reports)
        caps = self.probe.capabilities

        self.model_path = resolve_model(model)
        self.model_config = mc = ModelConfig.from_path(self.model_path)
        self.max_model_len = self._resolve_max_len(cfg, mc, caps)
        self.tokenizer = Tokenizer(self.model_path, mc.eos_token_ids)

        dev = self.registry.hook.llmcore_create_device(name=self.probe.name, config=cfg)
        if dev is None:
            raise PluginError(f"no plugin created device {self.probe.name!r} (plugin {chosen.plugin!r})")
        self.device = dev
        cfg.block_size = dev.block_size  # the user's, else the device's default
        log.info("device %s (%s), dtype %s, model %s", dev.name, self.probe.description, self.dtype,
                 self.model_path)
        if self.static is not None:
            self.runner = self.static.create_runner(dev, chosen, mc, self.tokenizer.eos_token_ids)
        elif cfg.tensor_parallel_size > 1:
            # one process per rank; validates the size against model and device before loading
            self.runner = TensorParallelRunner(
                dev, mc, self.model_path, self.dtype, self.tokenizer.eos_token_ids, self.max_model_len
            )
        else:
            self.runner = dev.create_runner(
                mc, self.model_path, self.dtype, self.tokenizer.eos_token_ids, self.max_model_len
            )
        try:
            if cfg.num_threads and hasattr(self.runner, "set_num_threads"):
                self.runner.set_num_threads(cfg.num_threads)
            num_blocks = self._num_kv_blocks(cfg)
            self.runner.allocate_kv_cache(num_blocks)
        except BaseException:
            self.shutdown()  # tensor-parallel workers must not outlive a failed start
            raise
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.structured = StructuredOutputs(self.tokenizer, mc.vocab_size, self.probe, self.runner)
        budget = cfg.max_num_batched_tokens or max(2048, cfg.max_num_seqs)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, budget, cfg.enable_chunked_prefill,
                                   cfg.long_prefill_threshold)
        self._requests: dict[str, Request] = {}
        self._counter = itertools.count()
        self._peak_waste = 0.0
        self._peak_used_slots = 0
        self._steps = 0
        self._finished_requests = 0
        self.out = OutputProcessor(self.tokenizer, self.max_model_len,
                                   streaming_detokenizer=bool(cfg.extra.get("streaming_detokenizer", True)))
        self._launch = self._choose_launch(cfg)
        self._worker = OutputWorker(self.out) if cfg.output_thread else None
        if self._worker is not None:
            log.info("output thread: detokenization, stop strings and outputs run beside the engine loop")
        self._inflight: _Launched | None = None
        self.phase_seconds: dict[str, float] | None = None  # see measure_phases()
        _raise_gc_threshold(cfg.gc_threshold)
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len %d",
                 num_blocks, cfg.block_size, num_blocks * self.runner.kv_bytes_per_block() / 2**20,
                 self.max_model_len)

    def _choose_launch(self, cfg: EngineConfig):
        """The runner's ``launch`` for overlapped steps, or None for synchronous ones."""
        launch = getattr(self.runner, "launch", None)
        if cfg.async_scheduling is False:
            return None
        if cfg.async_scheduling is None and not getattr(self.runner, "launch_by_default", True):
            return None  # the runner offers launch() but asks for it to be opt-in
        if launch is None and cfg.async_scheduling:
            launch = HostLaunch(self.runner).launch  # the overlapped loop over execute()
        if launch is not None:
            log.info("overlapped engine core: step n+1 is launched before step n's tokens are read")
        return launch

    def measure_phases(self) -> dict[str, float]:
        """Start adding up host seconds per step phase; returns the dict it updates.

        ``schedule`` (scheduler + bookkeeping), ``launch`` (the runner preparing and launching
        the batch; all of the execution for a synchronous runner), ``wait`` (for the device's
        tokens), ``output`` (the engine thread's share of output handling: tokens recorded,
        token-level stops, the output side's work when it runs inline), and the output side's
        ``detokenize`` (with stop strings and logprobs) and ``build`` (the RequestOutputs), on
        the output thread when there is one.
        """
        self.phase_seconds = dict.fromkeys(("schedule", "launch", "wait", "output", "detokenize", "build"), 0.0)
        self.out.timing = self.phase_seconds
        return self.phase_seconds

    def shutdown(self) -> None:
        """Stop what the runner runs outside this process (tensor-parallel worker processes).

        Idempotent. Single-device runners have nothing to stop; a tensor-parallel engine cannot
        step afterwards.
        """
        worker = self.__dict__.get("_worker")
        if worker is not None:
            worker.close()
            self._worker = None
        stop = getattr(self.__dict__.get("runner"), "shutdown", None)
        if stop is not None:
            stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- set-up

    @staticmethod
    def _resolve_max_len(cfg: EngineConfig, mc, caps) -> int:
        limit = mc.max_position_embeddings
        if caps.max_seq_len:
            limit = min(limit, caps.max_seq_len)
        if cfg.max_model_len is None:
            return limit
        if cfg.max_model_len > mc.max_position_embeddings:
            raise ConfigError(
                "max_model_len", cfg.max_model_len,
                f"exceeds the model's max_position_embeddings ({mc.max_position_embeddings})",
                f"Use max_model_len <= {mc.max_position_embeddings}",
            )
        if caps.max_seq_len and cfg.max_model_len > caps.max_seq_len:
            raise ConfigError(
                "max_model_len", cfg.max_model_len, f"exceeds the device's limit ({caps.max_seq_len})",
                f"Use max_model_len <= {caps.max_seq_len}",
            )
        return cfg.max_model_len

    def _num_kv_blocks(self, cfg: EngineConfig) -> int:
        per_block = self.runner.kv_bytes_per_block()
        blocks_per_seq = -(-self.max_model_len // cfg.block_size)
        if cfg.num_kv_blocks is not None:
            n = cfg.num_kv_blocks
        else:
            budget = cfg.kv_cache_memory or self.device.kv_cache_bytes(self.runner) or DEFAULT_CPU_KV_BYTES
            n = max(budget // per_block, 1)
            # never more than every slot at full length could use
            n = min(n, blocks_per_seq * cfg.max_num_seqs)
        if n < blocks_per_seq:
            if cfg.max_model_len is not None:
                raise ConfigError(
                    "max_model_len", self.max_model_len,
                    f"needs {blocks_per_seq} KV blocks per sequence but only {n} fit in the KV cache",
                    f"Lower max_model_len to <= {n * cfg.block_size} or raise kv_cache_memory/num_kv_blocks",
                )
            # not set by the user: fit the default to the cache instead of failing
            self.max_model_len = n * cfg.block_size
            log.warning("max_model_len defaults to %d, the most the KV cache holds for one sequence "
                        "(set max_model_len or kv_cache_memory to change it)", self.max_model_len)
        return n

    # ---------------------------------------------------------------- requests

    def _tokenize(self, prompt: str | Seq[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise RequestError("prompt", prompt, "encodes to zero tokens", "Pass a non-empty prompt")
            return prompt, ids
        ids = list(prompt)
        if not ids:
            raise RequestError("prompt_token_ids", ids, "is empty", "Pass at least one token id")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError("prompt_token_ids", bad[:5], f"contains ids outside [0, {vocab})")
        return None, ids

    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None,
        *, final_only: bool = False,
    ) -> str:
        """Queue a request; it joins the running batch at the next step.

        ``final_only``: :meth:`step` returns this request's output only once it has finished
        (what :meth:`generate` needs), not a cumulative one at every step.
        """
        params = params or SamplingParams()
        text, ids = self._tokenize(prompt)
        if self.static is not None:
            self.static.check_request(len(ids), params, self.model_config.max_position_embeddings)
        if len(ids) >= self.max_model_len:
            raise RequestError(
                "prompt", f"<{len(ids)} tokens>",
                f"is {len(ids)} tokens; max_model_len={self.max_model_len} leaves no room to generate",
                f"Shorten the prompt to at most {self.max_model_len - 1} tokens or raise max_model_len",
            )
        need = self.block_manager.blocks_needed(len(ids) + 1) * params.n
        if need > self.block_manager.num_blocks:
            raise RequestError(
                "prompt", f"<{len(ids)} tokens>",
                f"needs {need} KV blocks but the cache has {self.block_manager.num_blocks}",
                "Raise kv_cache_memory / num_kv_blocks or shorten the prompt",
            )
        self.structured.check(params)  # refuses or compiles (cached) a constraint
        rid = request_id if request_id is not None else f"req-{next(self._counter)}"
        if rid in self._requests:
            raise RequestError("request_id", rid, "is already in use")
        req = Request(rid, text, ids, params, final_only=final_only)
        seq = req.seqs[0]
        self.out.start(seq)
        self._requests[rid] = req
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. Returns False if unknown.

        A step computing it that is still in flight writes only into blocks that later steps
        (which run after it on the device) may reuse; its result is discarded.
        """
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        req.aborted = True
        for seq in req.seqs:
            if not seq.finished:
                self._finish(seq, "abort")
        # observers hear of aborts too (the hook's contract): what the output side has so far
        req.finish_time = time.monotonic()
        out = self.out.build(req)
        for o in out.outputs:
            o.finish_reason = o.finish_reason or "abort"
        out.finished = True
        self._emit_finished(req, out)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def output_pending(self) -> bool:
        """Steps whose outputs the output thread has not handed back yet."""
        return self._worker is not None and self._worker.pending > 0

    @property
    def output_thread(self) -> bool:
        """Whether detokenization, stop strings and outputs run on their own thread."""
        return self._worker is not None

    # -------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of the requests it advanced.

        Synchronous runners: schedule, execute, process. Overlapped (``launch``): the step
        whose outputs this call returns was launched by the previous call (or by this one, at
        the start); before reading its tokens this call schedules and launches the next step,
        unless the finished one must be seen first (``n > 1`` forks, penalties).
        """
        t0 = time.perf_counter()
        self._finish_stopped()
        cur = self._inflight
        if cur is None:
            cur = self._launch_next()
            if cur is None:  # nothing to run: what the output thread still has
                return self._finalize(self._worker.wait()) if self._worker is not None else []
        self._inflight = self._launch_next() if cur.overlap else None
        outputs = self._process(cur)
        self._steps += 1
        self._emit_step(cur.batch, time.perf_counter() - t0)
        return outputs

    def _finish_stopped(self) -> None:
        """Finish the sequences whose stop string the output side found (it fixed their output)."""
        stopped = self.out.stopped
        while stopped:
            seq = stopped.popleft()
            if not seq.finished:
                self._finish(seq, "stop")

    def _launch_next(self) -> "_Launched | None":
        """Schedule a batch and launch it; None when there is nothing to run."""
        timing = self.phase_seconds
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        seqs = self.scheduler.last_scheduled
        if not batch.seqs:
            if batch.finished_keys or batch.block_copies:
                self.runner.execute(batch)
            sched = self.scheduler
            if sched.waiting and not sched.running and self._inflight is None:
                raise RuntimeError(f"cannot schedule seq {sched.waiting[0].seq_id}: KV cache too small")
            return None
        t1 = time.perf_counter()
        handle = self._launch(batch) if self._launch is not None else DoneStep(self.runner.execute(batch))
        t2 = time.perf_counter()
        overlap = launched = self._launch is not None
        max_len = self.max_model_len
        for entry, seq in zip(batch.seqs, seqs):
            seq.num_computed_tokens += len(entry.token_ids)
            if not entry.sample:
                continue
            req = seq.request
            if entry.num_samples > 1 or req.needs_host_history:
                # the next schedule needs the forks / the real history / the grammar's next mask
                overlap = False
            elif launched:
                # the token this step samples is the next step's input: a placeholder until read,
                # unless it is the last one the sequence may get (then it is not scheduled again)
                ids = seq.token_ids
                nxt = len(ids) + 1
                if nxt - seq.num_prompt_tokens < req.params.max_tokens and nxt < max_len:
                    ids.append(PLACEHOLDER_TOKEN)
                    seq.num_placeholders += 1
        if timing is not None:
            timing["schedule"] += t1 - t0 + time.perf_counter() - t2
            timing["launch"] += t2 - t1
        return _Launched(batch, seqs, handle, overlap)

    def _process(self, cur: "_Launched") -> list[RequestOutput]:
        """Read a launched step's tokens and record them (the engine core's half: token-level
        stops free KV blocks now); the output side detokenizes and builds outputs, inline or on
        the output thread (:mod:`llmcore.engine.output`)."""
        timing = self.phase_seconds
        t0 = time.perf_counter()
        results = cur.handle.result()
        t1 = time.perf_counter()
        touched: dict[str, Request] = {}
        emitted: list[Emitted] = []
        now = time.monotonic()
        bm = self.block_manager
        # BlockManager.commit_full_blocks publishes a sequence's newly full blocks; its cheap
        # "nothing new" test is inlined (this loop runs per sequence per step)
        commit = bm.commit_full_blocks if bm.enable_prefix_caching else None
        bs = bm.block_size
        record = self.out.record
        finished = SeqStatus.FINISHED
        for entry, seq, res in zip(cur.batch.seqs, cur.seqs, results):
            if seq.status is finished:  # aborted, or stopped while this step was in flight: discard
                continue
            req = seq.request
            if not req.final_only:  # a final-only request is touched when it ends (an Emitted)
                touched[req.request_id] = req
            if commit is not None:  # full blocks whose tokens are all known go to the prefix cache
                known = min(seq.num_computed_tokens, len(seq.token_ids) - seq.num_placeholders)
                if known // bs > seq.num_hashed_blocks:
                    commit(seq, known)
            if res is None:
                continue
            if res.prompt_logprobs is not None and req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(res.prompt_logprobs)
            if not entry.sample:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            if entry.num_samples > 1:
                targets = [seq] + self._fork(seq, entry.num_samples - 1)
            else:
                targets = (seq,)
            pos = entry.start_pos + len(entry.token_ids)
            lps, chosen = res.logprobs, res.chosen_logprobs
            for i, s in enumerate(targets):
                e = record(s, res.token_ids[i], pos, lps[i] if lps else None, chosen[i] if chosen else None)
                if e is None:  # a quiet sequence's token: nothing for the output side
                    continue
                emitted.append(e)
                touched[req.request_id] = req
                if e.reason is not None:
                    self._finish(s, e.reason)
        self._track_waste()
        if self._worker is not None:
            self._worker.submit(emitted, list(touched.values()))
            outputs = self._finalize(self._worker.drain())
        else:
            outputs = self._finalize([self.out.process(emitted, list(touched.values()))])
        if timing is not None:
            timing["wait"] += t1 - t0
            timing["output"] += time.perf_counter() - t1
        return outputs

    def _finalize(self, done: list[StepOutputs]) -> list[RequestOutput]:
        """The outputs of finished output-side steps; finished requests leave the engine."""
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        # the output side queued every sequence a stop string ended before handing its step back
        self._finish_stopped()
        for step in done:
            for req, out in step.finished:
                if req.aborted or self._requests.get(req.request_id) is not req:
                    continue
                req.finish_time = now
                del self._requests[req.request_id]
                self._finished_requests += 1
                self._emit_finished(req, out)
            outputs.extend(out for out in step.outputs if not self._is_aborted(out))
        return outputs

    def _is_aborted(self, out: RequestOutput) -> bool:
        req = self._requests.get(out.request_id)
        return req is None and not out.finished

    def _finish(self, seq: Sequence, reason: str) -> None:
        """The engine core is done with ``seq``: its KV blocks are freed now."""
        if seq.num_placeholders:  # the token a step still in flight computes for it is dropped
            del seq.token_ids[len(seq.token_ids) - seq.num_placeholders:]
            seq.num_placeholders = 0
        seq.finish_reason = reason
        self.scheduler.finish(seq)

    def _fork(self, parent: Sequence, count: int) -> list[Sequence]:
        req = parent.request
        req.forked = True
        children = []
        after = parent
        for i in range(1, count + 1):
            child = Sequence(req, i, list(parent.token_ids))
            child.num_prompt_tokens = parent.num_prompt_tokens
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            self.out.start(child)
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child, after=after)
            req.seqs.append(child)
            children.append(child)
            after = child
        return children

    def _emit_finished(self, req: Request, out: RequestOutput) -> None:
        try:
            self.registry.hook.llmcore_request_finished(output=out, stats={
                "arrival_time": req.arrival_time,
                "first_token_time": req.first_token_time,
                "finish_time": req.finish_time,
                "num_prompt_tokens": len(req.prompt_token_ids),
                "num_generated_tokens": sum(len(o.token_ids) for o in out.outputs),
                "num_cached_tokens": out.num_cached_tokens,
            })
        except Exception:  # observers must never break serving
            log.exception("llmcore_request_finished observer failed")

    def _emit_step(self, batch, seconds: float) -> None:
        if not self.registry.hook.llmcore_step_stats.get_hookimpls():
            return  # nobody observes: the per-step sums cost O(batch)
        try:
            self.registry.hook.llmcore_step_stats(stats={
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                # a decode computes one token past the prompt; anything else (a one-token prompt or
                # last chunk included) is prefill
                "num_prefill_tokens": sum(s.num_new for s in batch.seqs
                                          if s.num_new > 1 or s.start_pos < s.num_prompt_tokens),
                "num_decode_tokens": sum(1 for s in batch.seqs
                                         if s.num_new == 1 and s.start_pos >= s.num_prompt_tokens),
                "kv_blocks_used": self.block_manager.num_blocks - self.block_manager.num_free_blocks,
                "kv_blocks_total": self.block_manager.num_blocks,
                "step_seconds": seconds,
            })
        except Exception:
            log.exception("llmcore_step_stats observer failed")

    def _track_waste(self) -> None:
        """KV waste at peak: allocated slots not holding a token, at the step with the most.

        O(1) per step; the exact count (a walk over the blocks) runs only when the
        number of blocks in use reaches a new peak.
        """
        bm = self.block_manager
        allocated = (bm.num_blocks - bm.num_free_blocks) * bm.block_size
        if allocated <= self._peak_used_slots:
            return
        # waste = the unfilled tail slots of each running sequence's table (shared blocks are
        # full, except a forked sample's last block until its first write copies it: counted
        # once). O(running sequences), and only at a new peak.
        bs = bm.block_size
        blocks = bm.blocks
        waste = 0
        shared_tails: set[int] = set()
        for s in self.scheduler.running:
            tbl = s.block_table
            free = len(tbl) * bs - s.num_computed_tokens
            if free <= 0:
                continue
            if blocks[tbl[-1]].ref_count > 1:
                if tbl[-1] in shared_tails:
                    continue
                shared_tails.add(tbl[-1])
            waste += free
        self._peak_used_slots = allocated
        self._peak_waste = waste / allocated if allocated else 0.0

    def stats(self) -> dict[str, Any]:
        """Live counters: queues, KV use, prefix-cache hit rate, preemptions, waste at peak."""
        bst = self.block_manager.stats()
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": bst.used,
            "kv_blocks_free": bst.free,
            "kv_blocks_total": bst.num_blocks,
            "prefix_cache_hit_rate": bst.hit_rate,
            "prefix_cache_hit_tokens": bst.prefix_hits,
            "prefix_cache_queried_tokens": bst.prefix_queried_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_waste_at_peak": self._peak_waste,
            "steps": self._steps,
            "finished_requests": self._finished_requests,
        }


def _raise_gc_threshold(young: int | None) -> None:
    """Raise CPython's young-generation collection threshold to ``young`` (EngineConfig.gc_threshold)."""
    if young is None:
        return
    first, *rest = gc.get_threshold()
    if first and first < young:  # 0: the collector is disabled; leave it so
        gc.set_threshold(young, *rest)
        log.debug("GC: young-generation threshold %d -> %d (EngineConfig.gc_threshold)", first, young)


@dataclass(slots=True)
class _Launched:
    """A step on its way: the batch, its sequences (batch order), the runner's handle."""

    batch: ScheduledBatch
    seqs: list[Sequence]
    handle: StepHandle
    # whether the next step may be launched before this one's tokens are read
    overlap: bool
