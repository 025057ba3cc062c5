"""What happens to a sampled token: detokenize, check stop conditions, build outputs.

The engine calls :meth:`OutputProcessor.append` for each token once it is known (with an
overlapping runner: while the device already runs the next step) and :meth:`build` for each
request a step advanced. Everything here costs O(new token) per token: the text grows through
the sequence's incremental detokenizer and stop strings are searched only in the new text plus
the ``longest stop - 1`` characters before it.
"""

from __future__ import annotations

import time
from typing import Any

from llmcore.engine.detokenizer import make_detokenizer
from llmcore.engine.sequence import Request, Sequence
from llmcore.outputs import CompletionOutput, RequestOutput
from llmcore.sampling_params import SamplingParams


class OutputProcessor:
    def __init__(self, tokenizer: Any, max_model_len: int, streaming_detokenizer: bool = True) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)
        self.max_model_len = max_model_len
        self.streaming_detokenizer = streaming_detokenizer
        self.timing: dict[str, float] | None = None  # Engine.measure_phases

    def start(self, seq: Sequence) -> None:
        """Give ``seq`` a fresh detokenizer primed with its prompt (new request or forked sample)."""
        seq.detok = make_detokenizer(self.tokenizer, seq.token_ids[: seq.num_prompt_tokens],
                                     seq.params.skip_special_tokens, self.streaming_detokenizer)

    def append(self, seq: Sequence, token: int, pos: int, lp, chosen: float | None) -> str | None:
        """Record ``token`` at ``pos`` (replacing its placeholder); return a finish reason or None."""
        p = seq.params
        ids = seq.token_ids
        if pos < len(ids):
            ids[pos] = token
            seq.num_placeholders -= 1
        else:
            ids.append(token)
        if chosen is not None:
            seq.cumulative_logprob += chosen
        if lp is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(lp)
        if self.timing is None:
            new_text = seq.detok.step(token)
        else:
            t0 = time.perf_counter()
            new_text = seq.detok.step(token)
            self.timing["detokenize"] += time.perf_counter() - t0
        if new_text:
            seq.text += new_text
        n_out = pos + 1 - seq.num_prompt_tokens
        reason: str | None = None
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                reason, seq.stop_reason = "stop", token
            elif not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif p.stop_strings and new_text:
                reason = self._check_stop_strings(seq, len(new_text))
        if reason is None and (n_out >= p.max_tokens or pos + 1 >= self.max_model_len):
            reason = "length"
        if reason is not None and not isinstance(seq.stop_reason, str):
            seq.text += seq.detok.flush()  # a cut multi-byte character at the end, as a full decode
        return reason

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_len: int) -> str | None:
        p = seq.params
        longest = max(len(s) for s in p.stop_strings)
        window_start = max(len(seq.text) - new_len - longest + 1, 0)
        best = None
        for s in p.stop_strings:
            i = seq.text.find(s, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        seq.text = seq.text[: i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
        seq.stop_reason = s
        return "stop"

    @staticmethod
    def build(req: Request) -> RequestOutput:
        seqs = req.seqs if len(req.seqs) == 1 else sorted(req.seqs, key=lambda s: s.index)
        outs = [
            CompletionOutput(
                index=s.index, text=s.text, token_ids=s.output_token_ids,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=s.logprobs, cumulative_logprob=s.cumulative_logprob,
            )
            for s in seqs
        ]
        first = req.seqs[0]
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            outputs=outs, finished=req.finished, num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=req.prompt_logprobs,
            metrics={
                "arrival_time": req.arrival_time,
                "first_token_time": req.first_token_time or 0.0,
            },
        )

    @staticmethod
    def holdback(params: SamplingParams) -> int:
        """Characters held back while streaming so a stop string is never leaked."""
        if not params.stop_strings or params.include_stop_str_in_output:
            return 0
        return max(len(s) for s in params.stop_strings) - 1
