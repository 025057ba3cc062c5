"""Host overhead of the engine per step, with a null device (no accelerator needed).

The "null" device's runner returns a token for every sampled sequence at once, so each step's
wall time is the engine's own host work: scheduling, preparing/launching, waiting (zero here),
output processing and, within it, detokenization (the real SmolLM2 tokenizer). It keeps
``--seqs`` sequences running (default 256) and times ``--steps`` decode steps after they are
all admitted. Old and new paths run in one process for an A/B:

* ``sync+window``: the synchronous loop with the window detokenizer over transformers' decode
  (what the engine did before the overlapped core),
* ``sync+stream``: the synchronous loop with the Rust streaming detokenizer,
* ``overlap+stream``: the overlapped loop (``async_scheduling=True``) with the streaming one,
* ``overlap+stream+thread``: the same with the output side on its own thread (``output_thread=True``),
* ``...+final``: requests added with ``final_only=True`` (as ``generate()`` does): a RequestOutput
  is built when a request finishes, not at every step (the other variants build one per request
  per step, as streaming does).

Besides the wall time per step it reports the engine thread's own CPU time per step
(``time.thread_time``): with an output thread, the work left on the engine loop.

    python benchmarks/host_overhead_bench.py                      # all three, 256 sequences
    python benchmarks/host_overhead_bench.py --seqs 16 --steps 20 # a quick check
    python benchmarks/host_overhead_bench.py --device-ms 4        # a device busy 4 ms a step: does
                                                                  # the host keep it fed?

Timings are meaningful only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from llmcore import hookimpl
from llmcore.capabilities import Capabilities, DeviceProbe
from llmcore.contract import SampleResult, ScheduledBatch
from llmcore.device import Device
from llmcore.engine.engine import Engine
from llmcore.plugins import load_plugins
from llmcore.sampling_params import SamplingParams

LLMCORE_CONTRACT_VERSION = 1
VOCAB_LO, VOCAB_SPAN = 300, 20000  # ordinary tokens of the SmolLM2 vocabulary


class _Pending:
    """A launched null step: its tokens are known at once, "ready" when the device would be done."""

    def __init__(self, results, ready: float) -> None:
        self.results, self.ready = results, ready

    def result(self):
        wait = self.ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # like waiting on a CUDA event: the GIL is free meanwhile
        return self.results


class NullRunner:
    """A runner that computes nothing: each sampled sequence gets a token derived from its position.

    ``device_s`` > 0 simulates a device: each step keeps it busy that long after it is launched
    (or after the step before it ends); ``execute`` waits for it (the synchronous loop), ``launch``
    returns at once (the overlapped loop; tokens do not depend on the inputs, so placeholders
    need no filling).
    """

    def __init__(self, device_s: float = 0.0) -> None:
        self.device_s = device_s
        self.busy_until = 0.0
        if device_s > 0:
            self.launch = self._start  # the overlapped-execution capability (ModelRunner.launch)

    def kv_bytes_per_block(self) -> int:
        return 1

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_kv_blocks = num_blocks

    def _tokens(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        return [SampleResult(token_ids=[VOCAB_LO + (e.seq_id * 31 + e.context_len * 17) % VOCAB_SPAN])
                if e.sample else None for e in batch.seqs]

    def _start(self, batch: ScheduledBatch) -> _Pending:
        start = max(time.perf_counter(), self.busy_until)
        self.busy_until = start + self.device_s
        return _Pending(self._tokens(batch), self.busy_until)

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        if self.device_s <= 0:
            return self._tokens(batch)
        return self._start(batch).result()

    def embed(self, token_ids):
        raise NotImplementedError("the null device does not embed")


DEVICE_S = 0.0  # set by --device-ms


class NullDevice(Device):
    def create_runner(self, model_config, folder, dtype, eos_token_ids, max_model_len):
        return NullRunner(DEVICE_S)


@hookimpl
def llmcore_probe(config):
    return DeviceProbe(name="null", score=1, capabilities=Capabilities(), description="null device (benchmark)")


@hookimpl
def llmcore_create_device(name, config):
    if name != "null":
        return None
    probe = llmcore_probe(config)
    return NullDevice(probe, config)


def run(variant: str, args) -> dict:
    loop, detok, *more = variant.split("+")
    registry = load_plugins(extra=[("null", sys.modules[__name__])])
    eng = Engine(model=args.model, device="null", dtype="float32", plugins=registry, progress=False,
                 max_num_seqs=args.seqs, num_kv_blocks=args.seqs * (-(-(args.prompt_len + args.steps + 64) // 16)),
                 block_size=16, max_num_batched_tokens=max(2048, args.seqs * args.prompt_len),
                 async_scheduling=loop == "overlap", output_thread="thread" in more,
                 extra={"streaming_detokenizer": detok == "stream"})
    p = SamplingParams(max_tokens=args.steps + 32, temperature=0, ignore_eos=True)
    for i in range(args.seqs):
        eng.add_request([VOCAB_LO + (i * 7 + j) % VOCAB_SPAN for j in range(args.prompt_len)], p,
                        final_only="final" in more)
    while len(eng.scheduler.running) < args.seqs or eng.scheduler.waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    phases = eng.measure_phases()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(args.steps):
        eng.step()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    for rid in list(eng._requests):
        eng.abort(rid)
    eng.shutdown()
    per = {k: round(v / args.steps * 1e3, 4) for k, v in phases.items()}
    busy = min(args.device_ms / 1e3 * args.steps / wall, 1.0) if args.device_ms > 0 else None
    return dict(variant=variant, seqs=args.seqs, steps=args.steps, ms_per_step=round(wall / args.steps * 1e3, 4),
                engine_thread_cpu_ms_per_step=round(cpu / args.steps * 1e3, 4), device_ms=args.device_ms,
                device_busy=busy, phase_ms_per_step=per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (its config and tokenizer); default: the embedded SmolLM2")
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--variants", default="sync+window,sync+stream,overlap+stream,overlap+stream+thread,"
                                          "overlap+stream+final,overlap+stream+thread+final")
    ap.add_argument("--json", action="store_true", help="one JSON line per variant")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    ap.add_argument("--device-ms", type=float, default=0.0,
                    help="simulate a device that takes this long per step (0: none; then nothing overlaps)")
    args = ap.parse_args()
    global DEVICE_S
    DEVICE_S = args.device_ms / 1e3
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.seqs} running sequences, {args.steps} decode steps, simulated device "
          + (f"{args.device_ms} ms per step" if args.device_ms > 0 else "none (tokens at once)"))
    variants = args.variants.split(",")
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every variant
        for v in variants:
            rounds[v].append(run(v, args))
    rows = []
    for v in variants:  # the round with the median engine-thread time, and the spread
        rs = sorted(rounds[v], key=lambda r: r["engine_thread_cpu_ms_per_step"])
        med = dict(rs[len(rs) // 2])
        med["rounds_ms_per_step"] = [r["ms_per_step"] for r in rounds[v]]
        med["rounds_engine_thread_cpu_ms"] = [r["engine_thread_cpu_ms_per_step"] for r in rounds[v]]
        rows.append(med)
    base = rows[0]["ms_per_step"]
    base_cpu = rows[0]["engine_thread_cpu_ms_per_step"]
    for r in rows:
        if args.json:
            print(json.dumps(r))
            continue
        ph = ", ".join(f"{k} {v:.3f}" for k, v in r["phase_ms_per_step"].items())
        print(f"{r['variant']:>22}: {r['ms_per_step']:.3f} ms/step wall ({base / r['ms_per_step']:.2f}x of "
              f"{rows[0]['variant']}), engine thread CPU {r['engine_thread_cpu_ms_per_step']:.3f} ms/step "
              f"({base_cpu / r['engine_thread_cpu_ms_per_step']:.2f}x)"
              + (f", device busy {r['device_busy']:.0%}" if r["device_busy"] is not None else "")
              + f"; per phase ms: {ph}; rounds (wall / engine thread ms): "
              + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(r["rounds_ms_per_step"], r["rounds_engine_thread_cpu_ms"])))


if __name__ == "__main__":
    main()
