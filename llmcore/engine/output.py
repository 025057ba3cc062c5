"""What happens to a sampled token, in two halves: the engine core's and the output side's.

**Engine core** (:meth:`OutputProcessor.record`, on the engine thread, O(1) per token): the
token replaces its placeholder in ``seq.token_ids`` and the token-level stops are checked (a
stop token id, EOS, ``max_tokens``, ``max_model_len``) so a finished sequence frees its KV
blocks before the next schedule. Each token becomes a :class:`Emitted` record.

**Output side** (:meth:`OutputProcessor.process`, O(new token) per token): detokenize through
the sequence's incremental detokenizer, search stop strings in the new text only (plus the
``longest stop - 1`` characters before it), collect logprobs and build the
:class:`RequestOutput` s. It runs inline after the core half, or on an :class:`OutputWorker`
thread (``EngineConfig.output_thread``) while the engine thread schedules and launches the next
steps. A stop string is found by the output side, possibly a step or two after the core sampled
further tokens: the output side fixes the sequence's final text, tokens and logprobs at the stop
and hands the sequence back (:attr:`OutputProcessor.stopped`) for the core to finish; tokens the
core sampled past the stop are never shown. Outputs are therefore the same, token for token, in
both modes.

Output-side state lives on the :class:`Sequence` (``text``, ``detok``, ``logprobs``,
``cumulative_logprob``, ``out_len``, ``out_reason``, ``out_stop_reason``); only the output side
writes it once the request is added.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from llmcore.engine.detokenizer import make_detokenizer
from llmcore.engine.sequence import Request, Sequence
from llmcore.outputs import CompletionOutput, RequestOutput
from llmcore.sampling_params import SamplingParams


@dataclass(slots=True)
class Emitted:
    """One sampled token on its way from the engine core to the output side."""

    seq: Sequence
    token: int
    pos: int  # its position in the sequence
    logprobs: Any
    chosen: float | None  # its own logprob (cumulative_logprob)
    reason: str | None  # the core's finish reason: "stop" (stop id / EOS) or "length"


@dataclass(slots=True)
class StepOutputs:
    """What the output side made of one step: outputs to return, requests that finished."""

    outputs: list[RequestOutput]
    finished: list[tuple[Request, RequestOutput]]


class OutputProcessor:
    def __init__(self, tokenizer: Any, max_model_len: int, streaming_detokenizer: bool = True) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)
        self.max_model_len = max_model_len
        self.streaming_detokenizer = streaming_detokenizer
        self.timing: dict[str, float] | None = None  # Engine.measure_phases
        # sequences a stop string ended, for the engine core to finish (thread-safe appends)
        self.stopped: collections.deque[Sequence] = collections.deque()

    def start(self, seq: Sequence) -> None:
        """Give ``seq`` a fresh detokenizer primed with its prompt (new request or forked sample).

        A request that wants its final output only and has no stop strings needs no text before
        it ends: it gets none, and one full decode of its tokens when it finishes (the same text:
        the incremental detokenizer equals a full decode, tests/test_detokenizer.py).
        """
        req = seq.request
        if not req.params.ignore_eos:
            req.stop_ids = frozenset(req.params.stop_token_ids) | self.eos_token_ids
        if req.final_only and not seq.params.stop_strings:
            seq.detok = None
            # nor anything per token unless it wants logprobs: record() keeps its count
            seq.quiet = req.params.logprobs is None
            return
        seq.quiet = False
        seq.detok = make_detokenizer(self.tokenizer, seq.token_ids[: seq.num_prompt_tokens],
                                     seq.params.skip_special_tokens, self.streaming_detokenizer)

    # ------------------------------------------------------------ engine core

    def record(self, seq: Sequence, token: int, pos: int, lp, chosen: float | None) -> Emitted | None:
        """Put ``token`` at ``pos`` (replacing its placeholder) and check the token-level stops
        (runs per sampled token on the engine thread: kept to a few attribute reads).

        Returns the token's :class:`Emitted` for the output side, or None for a quiet sequence
        (final output only, no text or logprobs before it ends) whose token does not end it:
        then the output side has nothing to do but count it, done here.
        """
        ids = seq.token_ids
        if pos < len(ids):
            ids[pos] = token
            seq.num_placeholders -= 1
        else:
            ids.append(token)
        req = seq.request
        p = req.params
        n_out = pos + 1 - seq.num_prompt_tokens
        reason = None
        if token in req.stop_ids and n_out >= p.min_tokens:  # stop token ids, EOS unless ignore_eos
            reason = "stop"
        elif n_out >= p.max_tokens or pos + 1 >= self.max_model_len:
            reason = "length"
        elif seq.quiet:
            # the output side's count, kept by the core: every token of a quiet sequence but its
            # last comes here, and the last (an Emitted) is handed over after them
            seq.out_len += 1
            if chosen is not None:
                seq.cumulative_logprob += chosen
            return None
        return Emitted(seq, token, pos, lp, chosen, reason)

    # ------------------------------------------------------------ output side

    def process(self, emitted: list[Emitted], touched: list[Request]) -> StepOutputs:
        """Detokenize, check stop strings and build the outputs of one step's ``touched`` requests."""
        timing = self.timing
        t0 = time.perf_counter() if timing is not None else 0.0
        ended = set()  # requests with a sample whose output ended in this step
        take = self._take
        for e in emitted:
            seq = e.seq
            if seq.out_reason is not None or seq.request.aborted:
                continue  # past a stop string the output side already found, or aborted
            if take(seq, e):
                ended.add(seq.request)
        if timing is not None:
            t1 = time.perf_counter()
            timing["detokenize"] += t1 - t0
        outputs, finished = [], []
        for req in touched:
            fin = req in ended and req.output_done
            if req.final_only and not fin or req.aborted:
                continue
            out = self.build(req)
            outputs.append(out)
            if fin:
                finished.append((req, out))
        if timing is not None:
            timing["build"] += time.perf_counter() - t1
        return StepOutputs(outputs, finished)

    def _take(self, seq: Sequence, e: Emitted) -> bool:
        """Detokenize one token, check stop strings; True when the sample's output ends here."""
        p = seq.params
        seq.out_len += 1
        if e.chosen is not None:
            seq.cumulative_logprob += e.chosen
        if e.logprobs is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(e.logprobs)
        detok = seq.detok
        new_text = ""
        if detok is not None:
            new_text = detok.step(e.token)
            if new_text:
                seq.text += new_text
        reason = e.reason
        if reason == "stop":
            if e.token in p.stop_token_ids:
                seq.out_stop_reason = e.token
        elif p.stop_strings and new_text and e.pos + 1 - seq.num_prompt_tokens >= p.min_tokens:
            if self._check_stop_strings(seq, len(new_text)):
                reason = "stop"
                self.stopped.append(seq)  # the core finishes it (it may have sampled on)
        if reason is not None:
            if detok is None:  # text deferred to the end (start())
                n = seq.num_prompt_tokens
                seq.text = self.tokenizer.decode(seq.token_ids[n : n + seq.out_len], p.skip_special_tokens)
            elif not isinstance(seq.out_stop_reason, str):
                seq.text += detok.flush()  # a cut multi-byte character at the end, as a full decode
            seq.out_reason = reason
            return True
        return False

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_len: int) -> bool:
        p = seq.params
        longest = max(len(s) for s in p.stop_strings)
        window_start = max(len(seq.text) - new_len - longest + 1, 0)
        best = None
        for s in p.stop_strings:
            i = seq.text.find(s, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        seq.text = seq.text[: i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
        seq.out_stop_reason = s
        return True

    @staticmethod
    def build(req: Request) -> RequestOutput:
        # per request per step while streaming: positional, in the dataclasses' field order
        # (CompletionOutput: index, text, token_ids, finish_reason, stop_reason, logprobs,
        # cumulative_logprob; RequestOutput: request_id, prompt, prompt_token_ids, outputs,
        # finished, num_cached_tokens, prompt_logprobs, metrics; tests/test_overlap.py pins them)
        seqs = req.seqs if len(req.seqs) == 1 else sorted(req.seqs, key=lambda s: s.index)
        outs = [
            CompletionOutput(s.index, s.text, s.token_ids[s.num_prompt_tokens : s.num_prompt_tokens + s.out_len],
                             s.out_reason, s.out_stop_reason, s.logprobs, s.cumulative_logprob)
            for s in seqs
        ]
        first = req.seqs[0]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.output_done,
                             first.num_cached_tokens, req.prompt_logprobs,
                             {"arrival_time": req.arrival_time, "first_token_time": req.first_token_time or 0.0})

    @staticmethod
    def holdback(params: SamplingParams) -> int:
        """Characters held back while streaming so a stop string is never leaked."""
        if not params.stop_strings or params.include_stop_str_in_output:
            return 0
        return max(len(s) for s in params.stop_strings) - 1


class OutputWorker:
    """The output side on its own thread: steps in, :class:`StepOutputs` out, in order.

    The engine thread :meth:`submit` s each step's records and :meth:`drain` s what is done; a
    failure on the worker is raised on the engine thread by the next :meth:`drain`/:meth:`wait`.
    """

    def __init__(self, processor: OutputProcessor) -> None:
        self.processor = processor
        self._in: queue.SimpleQueue = queue.SimpleQueue()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0  # steps submitted and not drained (engine thread only)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="llmcore-output", daemon=True)
        self._thread.start()

    def submit(self, emitted: list[Emitted], touched: list[Request]) -> None:
        self.pending += 1
        self._in.put((emitted, touched))

    def drain(self) -> list[StepOutputs]:
        """What the worker has finished, without waiting."""
        done = []
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                break
            done.append(self._check(item))
        return done

    def wait(self, timeout: float = 1.0) -> list[StepOutputs]:
        """At least one finished step (if any is pending and it finishes within ``timeout``)."""
        if not self.pending:
            return []
        try:
            first = self._check(self._out.get(timeout=timeout))
        except queue.Empty:
            return []
        return [first] + self.drain()

    def _check(self, item: Any) -> StepOutputs:
        self.pending -= 1
        if isinstance(item, BaseException):
            raise RuntimeError("the output thread failed") from item
        return item

    def _run(self) -> None:
        proc = self.processor
        while True:
            job = self._in.get()
            if job is None:
                return
            try:
                self._out.put(proc.process(*job))
            except BaseException as exc:  # handed to the engine thread, which raises it
                self._out.put(exc)

    def close(self, timeout: float = 5.0) -> None:
        self._in.put(None)
        self._thread.join(timeout)
