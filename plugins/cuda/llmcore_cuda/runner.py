# (over 450 lines: it was before the overlapped launch; the decode-graph, launch and eager paths share
# the staging buffers and row caches of one class)
"""The CUDA model runner: Triton kernels, CUDA graphs for decode, overlapped steps.

Subclasses the core :class:`~llmcore.runtime.runner.TorchModelRunner` (same
weights loading, KV layout, sampler) and replaces the hot paths:

* **Prefill / mixed steps** run the fused forward (:mod:`llmcore_cuda.model`)
  eagerly; their metadata travels in one pinned host buffer and one copy.
* **Decode steps** replay a CUDA graph captured at start for the smallest
  batch-size bucket that fits (padding rows write their K/V to a reserved sink
  block and attend to nothing). Larger batches, ``enforce_eager=True`` and
  batches that need prompt logprobs take the eager path.
* **Overlapped engine core** (:meth:`CudaModelRunner.launch`, the optional runner capability
  of :class:`llmcore.device.ModelRunner`): a greedy step is launched and returns at once; the
  engine schedules the next step meanwhile, whose placeholder tokens are copied on the GPU from
  this step's argmax, so the GPU never waits for the host. Host-sampled steps (temperature,
  logprobs, penalties) run synchronously inside ``launch``.
* **Greedy decode through ``execute``** (the synchronous engine, ``async_scheduling=False``)
  still overlaps a little: after a graph step the runner launches the *next* step at once
  (inputs = this step's argmax, positions + 1, same block tables) and only then waits for this
  step's tokens; when the engine's next batch is exactly that continuation the result is
  already computing, otherwise it is discarded.
* **Warm-up** (:meth:`CudaModelRunner.warm_up`): at start-up, after the graph capture, every
  eager-step kernel shape the engine can hit is compiled, and the log says how long it took.
* **Quantization** (``quantization=``, :mod:`llmcore.quantization`): the core
  runner's loader runs the method's handler (a module swap of the linear
  layers); the fused forward calls the swapped modules. Decode graphs are
  captured for them like for float layers; a method whose kernels cannot be
  captured runs eagerly, and the log says why (:data:`EAGER_QUANTIZATION`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from llmcore.contract import PLACEHOLDER_TOKEN, SampleResult, ScheduledBatch, ScheduledSeq, StepHandle
from llmcore.runtime.runner import TorchModelRunner
from llmcore.sampling_params import SamplingParams

log = logging.getLogger("llmcore.cuda")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
META_COLS = 4  # input id, position, slot, context length
MIN_MIXED_DECODES = 4  # mixed steps with this many decodes send them through the decode kernel

#: Quantization methods whose layers cannot be captured in a CUDA graph, with the reason
#: (verified on an H200 with bitsandbytes 0.50.2: the capture fails; docs/quantization.md).
#: Every other method is captured (eetq, int4, awq: Triton; bnb-nf4: bitsandbytes' 4-bit GEMV
#: and dequantize + GEMM, which capture and replay correctly); if a capture fails all the
#: same, decode falls back to eager and the log names the error.
EAGER_QUANTIZATION: dict[str, str] = {
    "bnb-int8": "bitsandbytes' LLM.int8() finds each step's outlier activation columns with "
                "torch.argwhere, a data-dependent shape that synchronizes with the host and cannot "
                "be held in a CUDA graph",
}


def graph_buckets(max_num_seqs: int, buckets=DEFAULT_BUCKETS) -> list[int]:
    """Buckets up to the first one that holds ``max_num_seqs`` (larger batches run eagerly)."""
    out = []
    for b in sorted(set(int(x) for x in buckets)):
        out.append(b)
        if b >= max_num_seqs:
            break
    return out


def _simple_greedy(entries) -> bool:
    """Every entry is plain greedy (argmax on the GPU, no host sampler); checked per step, so
    each distinct SamplingParams is tested once (a batch usually shares a few)."""
    seen = None
    for e in entries:
        p = e.params
        if e.num_samples != 1:
            return False
        if p is seen:
            continue
        # a constrained row is masked by the host sampler (llmcore.structured), never argmax'd on the GPU
        if not (p.greedy and not p.needs_penalties and p.logprobs is None and p.min_tokens == 0
                and p.structured_output is None):
            return False
        seen = p
    return True


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor
    tokens: torch.Tensor


@dataclass
class _Pending:
    """A decode step already launched (the speculative continuation)."""

    n: int
    bucket: int
    seq_ids: list[int]
    positions: list[int]  # the positions this step computes
    blocks: list[int]  # block holding each position (as the runner assumed)
    event: torch.cuda.Event
    host_tokens: torch.Tensor
    tokens_in: list[int] | None = None  # filled when the previous step's tokens are known


class _NullEvent:
    """Stand-in for torch.cuda.Event when the runner is exercised on the CPU (tests)."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _EagerGraph:
    """Stand-in for a CUDA graph on the CPU (tests): replay reruns the step into the same outputs."""

    def __init__(self, fn, logits, tokens) -> None:
        self.fn, self.logits, self.tokens = fn, logits, tokens

    def replay(self) -> None:
        logits, tokens = self.fn()
        self.logits.copy_(logits)
        self.tokens.copy_(tokens)


def _event(device):
    return torch.cuda.Event() if device.type == "cuda" else _NullEvent()


def _pinned(t: torch.Tensor, device) -> torch.Tensor:
    return t.pin_memory() if device.type == "cuda" else t


#: int32 elements per 16 bytes: every staged array starts on a 16-byte boundary
_ALIGN = 4


class _Staging:
    """Grow-only pinned host buffer + device buffer for int32 metadata, one H2D copy per step.

    Each array starts 16-byte aligned: Triton specializes a kernel on whether each pointer
    argument is 16-byte aligned, so views at arbitrary offsets (they follow the step's token
    count) made each eager step compile new kernel variants mid-workload (~9 s of JIT in the
    256-request workload on an H100 that the start-up warm-up could not cover).
    """

    def __init__(self, device) -> None:
        self.device = device
        self.host = _pinned(torch.empty(0, dtype=torch.int32), device)
        self.dev = torch.empty(0, dtype=torch.int32, device=device)
        self.event = None

    def put(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        total = sum(-(-a.size // _ALIGN) * _ALIGN for a in arrays)
        if total > self.host.numel():
            if self.event is not None:
                self.event.synchronize()
            cap = max(total, 2 * self.host.numel(), 4096)
            self.host = _pinned(torch.empty(cap, dtype=torch.int32), self.device)
            self.dev = torch.empty(cap, dtype=torch.int32, device=self.device)
        elif self.event is not None:
            self.event.synchronize()  # previous copy out of this host buffer is done
        h = self.host.numpy()
        off = 0
        spans = []
        for a in arrays:
            h[off : off + a.size] = a.reshape(-1)
            spans.append((off, a.size))
            off += -(-a.size // _ALIGN) * _ALIGN
        self.dev[:off].copy_(self.host[:off], non_blocking=True)
        if self.event is None:
            self.event = _event(self.device)
        self.event.record()
        return [self.dev[o : o + n] for o, n in spans]


class _Step:
    """A launched step (the contract's StepHandle): its sampled tokens, on the GPU and on their
    way to a pinned host buffer; ``rows`` maps a sequence to its row of those tokens."""

    def __init__(self, seqs, sampled, rows, results=None, dev_tokens=None, host=None, event=None):
        self.seqs, self.sampled, self.rows = seqs, sampled, rows
        self._results, self.dev_tokens, self.host, self.event = results, dev_tokens, host, event
        self._toks = None

    @classmethod
    def done(cls, seqs, results) -> "_Step":
        rows = {s.seq_id: i for i, (s, r) in enumerate(zip(seqs, results)) if r is not None and s.sample}
        return cls(seqs, None, rows, results=results)

    @classmethod
    def launched(cls, runner, seqs, tokens, sampled) -> "_Step":
        rows = {seqs[i].seq_id: j for j, i in enumerate(sampled) if seqs[i].sample}
        if tokens is None or not sampled:
            return cls(seqs, sampled, {}, results=[None] * len(seqs))
        host = runner._out_host[runner._out_flip]
        runner._out_flip ^= 1
        host[: len(sampled)].copy_(tokens, non_blocking=True)
        ev = _event(runner.device)
        ev.record()
        return cls(seqs, sampled, rows, dev_tokens=tokens, host=host, event=ev)

    def tokens(self) -> list:
        """The sampled tokens by row (waits for the step)."""
        if self._toks is None:
            if self.host is None:
                self._toks = [r.token_ids[0] if r is not None and r.token_ids else None for r in self._results]
            else:
                self.event.synchronize()
                self._toks = self.host[: len(self.sampled)].tolist()
        return self._toks

    def result(self) -> list[SampleResult | None]:
        if self._results is None:
            toks = self.tokens()
            res: list[SampleResult | None] = [None] * len(self.seqs)
            seqs = self.seqs
            for j, i in enumerate(self.sampled):
                if seqs[i].sample:
                    res[i] = SampleResult([toks[j]])  # token_ids (positional: per row per step)
            self._results = res
        return self._results


class CudaModelRunner(TorchModelRunner):
    #: the engine's overlapped loop (launch()) is the default on CUDA: on an H100 the 256-request
    #: workload ran at 23,199 tok/s overlapped vs 19,019 synchronous, each loop in its own cold
    #: Triton cache with no kernel compiled after start-up (docs/benchmarks.md);
    #: async_scheduling=False gives the synchronous loop
    launch_by_default = True

    def __init__(self, model_config, folder, device, dtype, block_size, max_model_len, eos_token_ids,
                 engine_config, seed: int = 0, progress: bool = True, quantization: str | None = None,
                 tp=None) -> None:
        from llmcore_cuda.attention import TritonPagedAttention
        from llmcore_cuda.model import FusedLlama

        # the core loader checks the checkpoint against the method and swaps the layers
        super().__init__(model_config, folder, device, dtype, TritonPagedAttention(), block_size=block_size,
                         max_model_len=max_model_len, eos_token_ids=eos_token_ids, seed=seed,
                         progress=progress, quantization=quantization, tp=tp)
        ec = engine_config
        extra = ec.extra or {}
        self.progress = progress
        self.fused = FusedLlama(self.model)
        from llmcore_cuda import kernels

        # batch-1 decode: Triton GEMVs, launched as programmatic dependent launches on Hopper+
        self.fused.gemv = bool(extra.get("cuda_gemv", True))
        self.fused.fuse_norm = self.fused.fuse_norm and bool(extra.get("cuda_fuse_norm", True))
        # (not with quantized layers: their kernels are ordinary launches, no dependent chain is left)
        self.fused.pdl = (bool(extra.get("cuda_pdl", True)) and device.type == "cuda"
                          and kernels.pdl_supported(device) and not self.fused.quantized)
        self.max_num_seqs = ec.max_num_seqs
        self.max_num_tokens = ec.max_num_batched_tokens or max(2048, ec.max_num_seqs)
        self.enforce_eager = bool(ec.enforce_eager)
        self.overlap = bool(extra.get("cuda_overlap", True)) and not self.enforce_eager
        # decode buckets up to this size use the fused skinny-GEMM path (FusedLlama.forward_small)
        self.small_max = int(extra.get("cuda_small_batch_max", 16))
        self.buckets = [] if self.enforce_eager else graph_buckets(
            ec.max_num_seqs, extra.get("cuda_graph_buckets", DEFAULT_BUCKETS))
        if self.buckets and quantization in EAGER_QUANTIZATION:
            log.warning("quantization=%r: decode runs eagerly, without CUDA graphs (%s)", quantization,
                        EAGER_QUANTIZATION[quantization])
            self.buckets = []
        self.max_blocks = -(-max_model_len // block_size)
        self.on_cuda = device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if self.on_cuda else 8
        self.graphs: dict[int, _Graph] = {}
        self.sink_block = -1
        self._staging = _Staging(device)
        self.warm_up_enabled = bool(extra.get("cuda_warm_up", device.type == "cuda"))
        self._staging_idx = _Staging(device)  # placeholder index pairs (launch)
        self._prev: _Step | None = None  # the step launched last (launch)
        rows = max(ec.max_num_seqs, max(self.buckets, default=1))
        self._out_host = [_pinned(torch.zeros(rows, dtype=torch.int64), device) for _ in range(2)]
        self._out_flip = 0
        self._pending: _Pending | None = None
        self._spec_flip = 0
        # overlap_hits/misses: execute()'s own speculation (the synchronous loop); fed_on_device: steps
        # of launch() (the overlapped loop) whose input tokens came from the previous step on the GPU
        self.stats = {"graph_steps": 0, "eager_steps": 0, "overlap_hits": 0, "overlap_misses": 0,
                      "fed_on_device": 0}
        # host seconds inside launch(), by part (a handful of perf_counter reads a step): where an
        # overlapped step's host time goes (benchmarks/cuda_bench.py and cuda_launch_probe.py print it)
        self.launch_s = dict.fromkeys(("placeholders", "rows", "copy", "replay", "eager", "handoff"), 0.0)

    # ---------------------------------------------------------------- memory

    @torch.inference_mode()
    def profile_kv_budget(self, utilization: float) -> int:
        """Bytes left for the KV cache after a warm-up at the largest step this engine runs.

        Runs a prefill of ``max_num_batched_tokens`` tokens (plus logits for up to
        ``max_num_seqs`` rows) on a scratch cache, measures the activation peak, and
        returns ``utilization * total - in_use - activation_peak - graph_reserve``.
        """
        cfg = self.config
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t = min(self.max_num_tokens, self.max_model_len)
        nb = -(-t // self.block_size) + 1
        shape = (nb, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        scratch = [(torch.zeros(shape, dtype=self.dtype, device=dev),
                    torch.zeros(shape, dtype=self.dtype, device=dev)) for _ in range(cfg.num_layers)]
        scratch_bytes = torch.cuda.memory_allocated(dev) - base
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (t,), generator=gen).tolist()
        pos = np.arange(t, dtype=np.int32)
        table = np.arange(nb, dtype=np.int32)
        slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
        from llmcore_cuda import kernels
        from llmcore_cuda.model import PrefillArgs

        ts, tm = kernels.prefill_tiles([t])
        v_ids, v_pos, v_slot, v_qs, v_ctx, v_ts, v_tm, v_bt = self._staging.put([
            np.asarray(ids, np.int32), pos, slots.astype(np.int32), np.array([0, t], np.int32),
            np.array([t], np.int32), np.asarray(ts, np.int32), np.asarray(tm, np.int32), table,
        ])
        t0 = time.perf_counter()
        hidden = self.fused.forward(v_ids, v_pos, v_slot, scratch,
                                    PrefillArgs(v_bt.view(1, nb), v_qs, v_ctx, v_ts, v_tm))
        rows = min(self.max_num_seqs, t)
        logits = self.fused.logits(hidden[-rows:]).float()
        logits.argmax(-1)
        torch.cuda.synchronize(dev)
        warm_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) - base - scratch_bytes
        del scratch, hidden, logits
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        in_use = total - free
        max_b = max(self.buckets) if self.buckets else 0
        graph_reserve = 2 * max_b * cfg.vocab_size * (self.dtype.itemsize + 8) + (256 << 20 if max_b else 0)
        budget = int(total * utilization) - in_use - peak - graph_reserve
        log.info(
            "CUDA memory: %.2f GiB total, %.2f GiB in use after loading (weights %.2f GiB), warm-up of "
            "%d tokens peaked at %.2f GiB of activations (%.1f s), CUDA-graph reserve %.2f GiB -> KV budget "
            "%.2f GiB at gpu_memory_utilization=%.2f",
            total / 2**30, in_use / 2**30, base / 2**30, t, peak / 2**30, warm_s, graph_reserve / 2**30,
            max(budget, 0) / 2**30, utilization,
        )
        self.memory_report = dict(total=total, in_use=in_use, weights=base, activation_peak=peak,
                                  graph_reserve=graph_reserve, kv_budget=max(budget, 0),
                                  utilization=utilization)
        return max(budget, 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """``num_blocks`` usable blocks plus one sink block for CUDA-graph padding rows."""
        super().allocate_kv_cache(num_blocks + 1)
        self.num_kv_blocks = num_blocks
        self.sink_block = num_blocks
        self._init_decode_buffers()
        if self.buckets:
            if self.quantization is None:
                self.capture_graphs()
            else:
                self._capture_or_eager()
        if self.warm_up_enabled:
            self.warm_up()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile, at start-up, the eager-step kernels every workload can hit, so no request pays JIT.

        Decode graphs are captured already; the eager paths specialize the Triton kernels on the
        number of split-K slices (from the number of decodes and the longest context), so one
        mixed step runs per value any step can reach, plus prefills and large eager decodes.
        Every other argument keeps one specialization whatever the step (tests/cuda:
        test_eager_kernel_arguments_keep_one_specialization; on a GPU
        test_workload_compiles_no_kernels_after_start_up). Runs on garbage KV (every block it
        writes is rewritten before any request reads it).
        """
        from llmcore_cuda import kernels

        t0 = time.perf_counter()
        bs, kvh = self.block_size, self.config.num_kv_heads
        sp = SamplingParams(max_tokens=1, temperature=0.0)
        budget = min(self.max_num_tokens, self.max_model_len)

        def entry(i: int, start: int, n: int) -> ScheduledSeq:
            table = [j % self.num_kv_blocks for j in range(-(-(start + n) // bs))]
            return ScheduledSeq(seq_id=-1 - i, key=f"warm-up:{i}", token_ids=[1] * n, start_pos=start,
                                block_table=table, params=sp, history=[], num_prompt_tokens=start + n)

        # every split-K value a step can reach: it depends on the number of decodes and, through
        # the number of context tiles (a power of two), on the longest context; the other kernel
        # arguments keep one specialization (aligned staging views, block tables 16 wide)
        ctxs = [c for c in (1 << k for k in range(4, self.max_model_len.bit_length())) if c < self.max_model_len]
        ctxs.append(self.max_model_len)
        seen: dict[tuple[str, int], tuple[int, int]] = {}
        for d in range(1, self.max_num_seqs + 1):
            for c in ctxs:
                split = kernels.choose_num_splits(d, kvh, c, bs, self.num_sms)
                if MIN_MIXED_DECODES <= d < budget - 1:  # room for a two-token prefill beside them
                    seen.setdefault(("mixed", split), (d, c))
                if not self.buckets or d > self._mb:
                    seen.setdefault(("decode", split), (d, c))
        batches = [[entry(0, 0, n)] for n in sorted({1, 17, min(128, budget), budget})]
        for (kind, _), (d, c) in seen.items():
            decs = [entry(i, c - 1, 1) for i in range(d)]
            prefill = [entry(d, 0, min(17, budget - d))] if kind == "mixed" else []
            batches.append(decs + prefill)
        for seqs in batches:
            self._execute_eager(ScheduledBatch(seqs), all(len(s.token_ids) == 1 for s in seqs))
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        self.stats = dict.fromkeys(self.stats, 0)
        log.info("warm-up: %d eager step shapes compiled in %.1f s", len(batches), time.perf_counter() - t0)

    def _capture_or_eager(self) -> None:
        """Capture the decode graphs of a quantized model; eager decode if its kernels cannot be.

        A quantized layer runs a kernel this plugin does not own (bitsandbytes, eetq); one that
        synchronizes with the host (a data-dependent shape, ``.item()``) fails to capture. That
        costs speed, not correctness, so decode falls back to eager and the log says why.
        """
        try:
            self.capture_graphs()
        except RuntimeError as exc:
            self.graphs.clear()
            if self.on_cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            # ending the broken capture raises "operation failed due to a previous error during
            # capture"; the error that broke it is the one to report
            cause = exc
            while cause.__context__ is not None:
                cause = cause.__context__
            text = str(cause).strip().splitlines()
            log.warning("quantization=%r: CUDA-graph capture of decode failed (%s: %s); decode runs eagerly",
                        self.quantization, type(cause).__name__, text[0] if text else "")

    # ---------------------------------------------------------- decode graphs

    def _init_decode_buffers(self) -> None:
        from llmcore_cuda import kernels

        cfg = self.config
        mb = max(self.buckets) if self.buckets else 0
        self._mb = mb
        w = self.max_blocks
        if not mb:
            return
        n = mb * META_COLS + mb * w
        self._dec_host = _pinned(torch.zeros(n, dtype=torch.int32), self.device)
        self._dec_np = self._dec_host.numpy()
        self._meta_np = self._dec_np[: mb * META_COLS].reshape(mb, META_COLS)
        self._bt_np = self._dec_np[mb * META_COLS :].reshape(mb, w)
        self._dec_dev = torch.zeros(n, dtype=torch.int32, device=self.device)
        self._meta_dev = self._dec_dev[: mb * META_COLS].view(mb, META_COLS)
        self._bt_dev = self._dec_dev[mb * META_COLS :].view(mb, w)
        # speculative steps: meta only (block tables unchanged), two alternating host buffers
        self._spec_host = [_pinned(torch.zeros(mb * META_COLS, dtype=torch.int32), self.device)
                           for _ in range(2)]
        self._tok_host = [_pinned(torch.zeros(mb, dtype=torch.int64), self.device) for _ in range(2)]
        self._tok_flip = 0
        self._row_keys: list[tuple[int, int, int] | None] = [None] * mb
        self._dec_event = None  # after the last H2D copy out of _dec_host
        self._splits = {
            b: kernels.choose_num_splits(b, cfg.num_kv_heads, self.max_model_len, self.block_size, self.num_sms)
            for b in self.buckets
        }
        ws_rows = max(b * cfg.num_heads * s for b, s in self._splits.items())
        self._workspace = kernels.decode_workspace(1, ws_rows, cfg.head_dim, 1, self.device)
        self._set_padding(0, mb)

    def _set_padding(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        m = self._meta_np
        m[lo:hi, 0] = 0
        m[lo:hi, 1] = 0
        m[lo:hi, 2] = self.sink_block * self.block_size
        m[lo:hi, 3] = 0
        self._bt_np[lo:hi, 0] = self.sink_block
        for i in range(lo, hi):
            self._row_keys[i] = None

    def _decode_forward(self, b: int):
        from llmcore_cuda.model import DecodeArgs

        meta = self._meta_dev[:b]
        args = DecodeArgs(self._bt_dev[:b], meta[:, 3], self._splits[b], self._workspace)
        fwd = self.fused.forward_small if b <= self.small_max else self.fused.forward
        hidden = fwd(meta[:, 0], meta[:, 1], meta[:, 2], self.kv_caches, args)
        logits = self.fused.logits(hidden)
        return logits, self._argmax(logits)

    def _argmax(self, logits):
        from llmcore_cuda import kernels

        return kernels.argmax(logits) if logits.stride(1) == 1 else logits.argmax(dim=-1)

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        t0 = time.perf_counter()
        self._dec_dev.copy_(self._dec_host)
        if not self.on_cuda:
            for b in self.buckets:
                logits, tokens = self._decode_forward(b)
                eg = _EagerGraph(lambda b=b: self._decode_forward(b), logits, tokens)
                self.graphs[b] = _Graph(eg, logits, tokens)
            return
        pool = torch.cuda.graph_pool_handle()
        buckets = sorted(self.buckets, reverse=True)
        it = buckets
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(buckets, desc="Capturing CUDA graphs", unit="graph", leave=False)
            it = bar
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in it:
                if bar is not None:
                    bar.set_postfix(batch=b)
                for _ in range(2):  # compile kernels, init cuBLAS for this shape
                    self._decode_forward(b)
                stream.synchronize()
                # one instance per bucket: replaying it while its previous launch still runs
                # returns at once (3-10 us on an H100, benchmarks/cuda_launch_probe.py)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    logits, tokens = self._decode_forward(b)
                self.graphs[b] = _Graph(g, logits, tokens)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs for decode batch sizes %s in %.1f s (split-K slices %s)",
                 len(self.graphs), sorted(self.graphs), time.perf_counter() - t0,
                 {b: self._splits[b] for b in sorted(self._splits)})

    def _bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    # ---------------------------------------------------------------- execute

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        if batch.finished_keys:
            self.sampler.release(batch.finished_keys)
        if batch.block_copies:
            self._copy_blocks(batch.block_copies)
        seqs = batch.seqs
        if not seqs:
            return []
        n = len(seqs)
        decode_only = all(len(s.token_ids) == 1 for s in seqs)
        if any(s.want_prompt_logprobs for s in seqs):
            self._pending = None
            self.stats["eager_steps"] += 1
            return super().execute(batch)
        if decode_only and self.graphs and n <= self._mb:
            return self._execute_graph(batch)
        self._pending = None
        self.stats["eager_steps"] += 1
        return self._execute_eager(batch, decode_only)

    # -- graph decode

    def _execute_graph(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        seqs = batch.seqs
        n = len(seqs)
        b = self._bucket(n)
        greedy = _simple_greedy(seqs)
        pend = self._pending
        self._pending = None
        self.stats["graph_steps"] += 1
        if pend is not None and not batch.block_copies and greedy and self._matches(pend, seqs):
            self.stats["overlap_hits"] += 1
            if self.overlap:
                self._pending = self._launch_speculative(pend, seqs)
            pend.event.synchronize()
            toks = pend.host_tokens[:n].tolist()
            if self._pending is not None:
                self._pending.tokens_in = toks
            return [SampleResult(token_ids=[t]) if s.sample else None for s, t in zip(seqs, toks)]
        if pend is not None:
            self.stats["overlap_misses"] += 1
        # normal launch: fill rows, one H2D copy, replay
        pos, blocks = self._fill_rows(seqs, b)
        self._dec_dev[: self._mb * META_COLS + b * self.max_blocks].copy_(
            self._dec_host[: self._mb * META_COLS + b * self.max_blocks], non_blocking=True)
        g = self.graphs[b]
        g.graph.replay()
        if not greedy:
            logits = g.logits[:n].float()
            sample_idx = [i for i, s in enumerate(seqs) if s.sample]
            results: list[SampleResult | None] = [None] * n
            if sample_idx:
                sub = logits if len(sample_idx) == n else logits[sample_idx]
                for i, res in zip(sample_idx, self.sampler(sub, [seqs[i] for i in sample_idx])):
                    results[i] = res
            return results
        host_tok = self._tok_host[self._tok_flip]
        self._tok_flip ^= 1
        host_tok[:b].copy_(g.tokens, non_blocking=True)
        ev = _event(self.device)
        ev.record()
        cur = _Pending(n, b, [s.seq_id for s in seqs], pos, blocks, ev, host_tok)
        if self.overlap:
            self._pending = self._launch_speculative(cur, seqs)
        ev.synchronize()
        toks = host_tok[:n].tolist()
        if self._pending is not None:
            self._pending.tokens_in = toks
        return [SampleResult(token_ids=[t]) if s.sample else None for s, t in zip(seqs, toks)]

    def _fill_rows(self, seqs, b: int, fill_rows=()) -> tuple[list[int], list[int]]:
        """Write the decode rows of ``seqs`` into the pinned host buffer (bucket ``b``).

        A row's block table is rewritten only where it changed: whole when the row now holds
        another sequence or its ``blocks_version`` moved (copy-on-write, preemption), else just
        the blocks appended since (O(changes), not O(blocks) per step). ``fill_rows`` get input
        id 0: their token is copied on the device afterwards.
        """
        if self._dec_event is not None:
            self._dec_event.synchronize()  # the last copy out of this buffer has been done
        bs = self.block_size
        n = len(seqs)
        ids, pos, slots, blocks = [], [], [], []
        keys = self._row_keys
        bt_np = self._bt_np
        for i, s in enumerate(seqs):
            p = s.start_pos
            tbl = s.block_table
            blk = tbl[p // bs]
            ids.append(s.token_ids[0])
            pos.append(p)
            blocks.append(blk)
            slots.append(blk * bs + p % bs)
            key = keys[i]
            m = len(tbl)
            if key is None or key[0] != s.seq_id or key[1] != s.blocks_version or key[2] > m:
                bt_np[i, :m] = tbl
                keys[i] = (s.seq_id, s.blocks_version, m)
            elif key[2] < m:
                bt_np[i, key[2]:m] = tbl[key[2]:]
                keys[i] = (s.seq_id, s.blocks_version, m)
        meta = self._meta_np
        meta[:n, 0] = ids
        for i in fill_rows:
            meta[i, 0] = 0
        meta[:n, 1] = pos
        meta[:n, 2] = slots
        meta[:n, 3] = pos
        meta[:n, 3] += 1
        mb = self._mb
        if n < mb and keys[n] is not None:
            self._set_padding(n, mb)
        return pos, blocks

    def _matches(self, pend: _Pending, seqs) -> bool:
        if pend.n != len(seqs) or pend.tokens_in is None:
            return False
        bs = self.block_size
        for s, sid, p, blk, tok in zip(seqs, pend.seq_ids, pend.positions, pend.blocks, pend.tokens_in):
            if s.seq_id != sid or s.start_pos != p or s.token_ids[0] != tok:
                return False
            tbl = s.block_table
            if len(tbl) <= p // bs or tbl[p // bs] != blk:
                return False
        return True

    def _launch_speculative(self, cur: _Pending, seqs) -> _Pending | None:
        """Launch the step after ``cur`` with its argmax as inputs (greedy continuation)."""
        bs = self.block_size
        n, b = cur.n, cur.bucket
        npos = [p + 1 for p in cur.positions]
        blocks = []
        limit = self.max_model_len
        for s, p in zip(seqs, npos):
            tbl = s.block_table
            j = p // bs
            if j >= len(tbl) or p >= limit:
                return None  # needs a block the engine has not allocated yet (or at the length limit)
            blocks.append(tbl[j])
        host = self._spec_host[self._spec_flip]
        self._spec_flip ^= 1
        m = host.numpy().reshape(-1, META_COLS)
        m[:] = self._meta_np  # padding rows and stale rows as in the last normal launch
        m[:n, 1] = npos
        m[:n, 2] = np.asarray(blocks, np.int64) * bs + np.asarray(npos, np.int64) % bs
        m[:n, 3] = npos
        m[:n, 3] += 1
        g = self.graphs[b]
        meta_dev = self._meta_dev
        self._dec_dev[: self._mb * META_COLS].copy_(host, non_blocking=True)
        meta_dev[:b, 0].copy_(g.tokens)  # inputs = the argmax of the step before (still on the GPU)
        g.graph.replay()
        host_tok = self._tok_host[self._tok_flip]
        self._tok_flip ^= 1
        host_tok[:b].copy_(g.tokens, non_blocking=True)
        ev = _event(self.device)
        ev.record()
        # (the host mirror self._meta_np is left alone: a normal launch rewrites every live row,
        # and its last copy may still be in flight)
        return _Pending(n, b, cur.seq_ids, npos, blocks, ev, host_tok)

    # ------------------------------------------------------ overlapped launch

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> StepHandle:
        """Start a step without waiting for it (the engine's overlapped loop; ModelRunner.launch).

        Greedy steps never wait: the tokens stay on the GPU, the next step's placeholders are
        copied from them on the GPU, and one pinned copy brings them to the host, read by
        ``result()``. Steps that sample on the host (temperature, logprobs, penalties) or need
        prompt logprobs run as :meth:`execute` does; their placeholders are filled on the host
        from the previous step's results.
        """
        clock = time.perf_counter
        acc = self.launch_s
        t0 = clock()
        seqs = batch.seqs
        prev, self._prev = self._prev, None
        fill = []  # (batch index, row of the previous step's tokens)
        decode_only = True
        prompt_logprobs = False
        rows = prev.rows if prev is not None else {}
        for i, s in enumerate(seqs):  # one pass (this runs per sequence per step)
            ids = s.token_ids
            if len(ids) != 1:
                decode_only = False
            if s.want_prompt_logprobs:
                prompt_logprobs = True
            if ids and ids[0] == PLACEHOLDER_TOKEN:
                r = rows.get(s.seq_id)
                if r is None:
                    raise RuntimeError(f"seq {s.seq_id}: placeholder token but it was not in the previous step")
                fill.append((i, r))
        host_sampling = prompt_logprobs or not _simple_greedy(seqs)
        if fill and (host_sampling or prev.dev_tokens is None):
            toks = prev.tokens()
            for i, r in fill:
                seqs[i].token_ids[0] = toks[r]
            fill = []
        t1 = clock()
        acc["placeholders"] += t1 - t0
        if host_sampling or not seqs:
            results = self.execute(batch)
            self._prev = _Step.done(seqs, results)
            acc["eager"] += clock() - t1
            return self._prev
        if batch.finished_keys:
            self.sampler.release(batch.finished_keys)
        if batch.block_copies:
            self._copy_blocks(batch.block_copies)
        self._pending = None  # execute()'s own speculation is not used with launch()
        n = len(seqs)
        if decode_only and self.graphs and n <= self._mb:
            self.stats["graph_steps"] += 1
            b = self._bucket(n)
            self._fill_rows(seqs, b, [i for i, _ in fill])
            t2 = clock()
            end = self._mb * META_COLS + b * self.max_blocks
            self._dec_dev[:end].copy_(self._dec_host[:end], non_blocking=True)
            self._dec_event = _event(self.device)
            self._dec_event.record()
            if fill:
                self._fill_ids(self._meta_dev[:, 0], fill, prev.dev_tokens)
            g = self.graphs[b]
            t3 = clock()
            g.graph.replay()
            t4 = clock()
            acc["rows"] += t2 - t1
            acc["copy"] += t3 - t2
            acc["replay"] += t4 - t3
            tokens, sampled = g.tokens[:n], list(range(n))
        else:
            self.stats["eager_steps"] += 1
            tokens, sampled = self._execute_eager(batch, decode_only, fill, prev, defer=True)
            t4 = clock()
            acc["eager"] += t4 - t1
        self._prev = _Step.launched(self, seqs, tokens, sampled)
        acc["handoff"] += clock() - t4
        return self._prev

    def _fill_ids(self, ids_dev, fill, src) -> None:
        """``ids_dev[dst] = src[row]`` for each placeholder, on the device (no host round trip)."""
        self.stats["fed_on_device"] += 1
        if all(i == r for i, r in fill) and [i for i, _ in fill] == list(range(len(fill))):
            ids_dev[: len(fill)].copy_(src[: len(fill)])  # steady decode: same rows, same order
            return
        idx = self._staging_idx.put([np.asarray(fill, np.int32).T.copy()])[0].view(2, -1).long()
        ids_dev.index_copy_(0, idx[0], src.index_select(0, idx[1]).to(ids_dev.dtype))

    # -- eager (prefill, mixed, large decode)

    def _execute_eager(self, batch: ScheduledBatch, decode_only: bool, fill=None, prev=None, defer: bool = False):
        """Prefill, mixed and large decode steps, eagerly.

        ``fill``: ``(batch index, source row)`` pairs whose input token is row ``source`` of the
        previous step's device tokens (placeholders); ``defer``: greedy tokens stay on the
        device, returned as ``(tokens, sampled indices)`` for :meth:`launch`.
        """
        from llmcore_cuda import kernels
        from llmcore_cuda.model import DecodeArgs, PrefillArgs

        seqs = batch.seqs
        bs = self.block_size
        n = len(seqs)
        # a multiple of 16: the kernels take the row stride as an argument, which Triton
        # specializes on divisibility by 16 (a width that follows the step would recompile them)
        width = -(-max(len(s.block_table) for s in seqs) // 16) * 16
        bt = np.zeros((n, width), np.int32)
        ids: list[int] = []
        qlens, first = [], []
        sample_idx = []
        for i, s in enumerate(seqs):  # per sequence only what numpy cannot do for the batch
            tbl = s.block_table
            bt[i, : len(tbl)] = tbl
            toks = s.token_ids
            ids.extend(toks)
            qlens.append(len(toks))
            first.append(s.start_pos)
            if s.sample:
                sample_idx.append(i)
        ql_np = np.asarray(qlens, np.int32)
        ends = np.cumsum(ql_np, dtype=np.int32)
        starts_np = np.zeros(n + 1, np.int32)
        starts_np[1:] = ends
        starts = starts_np.tolist()
        first_np = np.asarray(first, np.int32)
        ctx_np = first_np + ql_np
        ctx = ctx_np.tolist()
        # each token's position (its sequence's first position + its offset in the chunk) and
        # KV slot (its block from the sequence's table row)
        row_of = np.repeat(np.arange(n, dtype=np.int32), ql_np)
        pos = np.arange(starts[-1], dtype=np.int32) - np.repeat(starts_np[:-1] - first_np, ql_np)
        slots = bt[row_of, pos // bs] * bs + pos % bs
        rows = ends[sample_idx] - 1 if sample_idx else np.zeros(0, np.int32)
        arrays = [np.asarray(ids, np.int32), pos, slots.astype(np.int32, copy=False),
                  starts_np, ctx_np, bt, rows.astype(np.int32, copy=False)]
        if fill:  # (flat position of the placeholder, source row): filled on the device below
            fill = [(starts[i], r) for i, r in fill]
        if decode_only:
            v_ids, v_pos, v_slot, _, v_ctx, v_bt, v_rows = self._staging.put(arrays)
            if fill:
                self._fill_ids(v_ids, fill, prev.dev_tokens)
            splits = kernels.choose_num_splits(n, self.config.num_kv_heads, max(ctx), bs, self.num_sms)
            args = DecodeArgs(v_bt.view(n, width), v_ctx, splits, None)
        else:
            qlens = [len(s.token_ids) for s in seqs]
            dec = [i for i, q in enumerate(qlens) if q == 1]
            mixed = len(dec) >= MIN_MIXED_DECODES
            ts, tm = kernels.prefill_tiles(qlens, min_len=2 if mixed else 1)
            arrays += [np.asarray(ts, np.int32), np.asarray(tm, np.int32)]
            if mixed:
                arrays.append(np.asarray(dec, np.int32))
                views = self._staging.put(arrays)
                v_dec = views[-1]
                if fill:
                    self._fill_ids(views[0], fill, prev.dev_tokens)
                splits = kernels.choose_num_splits(len(dec), self.config.num_kv_heads,
                                                   max(ctx[i] for i in dec), bs, self.num_sms)
            else:
                views = self._staging.put(arrays)
                v_dec, splits = None, 1
                if fill:
                    self._fill_ids(views[0], fill, prev.dev_tokens)
            v_ids, v_pos, v_slot, v_qs, v_ctx, v_bt, v_rows, v_ts, v_tm = views[:9]
            args = PrefillArgs(v_bt.view(n, width), v_qs, v_ctx, v_ts, v_tm, v_dec, splits)
        hidden = self.fused.forward(v_ids, v_pos, v_slot, self.kv_caches, args)
        results: list[SampleResult | None] = [None] * n
        if not sample_idx:
            return (None, sample_idx) if defer else results
        h = hidden if len(sample_idx) == hidden.shape[0] else hidden.index_select(0, v_rows.long())
        logits = self.fused.logits(h)
        entries = [seqs[i] for i in sample_idx]
        if defer:
            return self._argmax(logits), sample_idx
        if _simple_greedy(entries):
            toks = logits.argmax(dim=-1).tolist()
            for i, t in zip(sample_idx, toks):
                results[i] = SampleResult(token_ids=[t])
        else:
            for i, res in zip(sample_idx, self.sampler(logits.float(), entries)):
                results[i] = res
        return results
