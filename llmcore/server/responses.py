"""Responses: engine outputs in, OpenAI response objects, stream chunks and SSE lines out.

:class:`ResponseBuilder` turns the outputs of one API request (one engine request per prompt,
``n`` samples each) into a whole ``chat.completion`` / ``text_completion`` object or into the
chunks of a stream, holding back text that could still become a stop string. No web framework
here: the HTTP routes and ``llmcore batch`` share it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from llmcore.outputs import CompletionOutput, RequestOutput
from llmcore.sampling_params import SamplingParams
from llmcore.server.convert import PromptInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def holdback(params: SamplingParams) -> int:
    """Characters held back while streaming so a stop string never leaks (as Engine.stream)."""
    if not params.stop_strings or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in params.stop_strings) - 1


# --------------------------------------------------------------- logprobs


class TokenDecoder:
    """Token id -> text for logprobs, cached. Decoding is read-only, safe off the engine thread."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self.cache) < 200_000:
                self.cache[token_id] = s
        return s


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI uses -9999.0 for "impossible"
    return x if x > -9999.0 else -9999.0


def completion_logprobs(
    token_ids: Sequence[int], lps: Sequence[dict] | None, decode: TokenDecoder, offset: int = 0,
) -> tuple[dict[str, Any] | None, int]:
    """OpenAI /v1/completions logprobs for these tokens; returns (dict, next text offset)."""
    if lps is None:
        return None, offset
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, d in zip(token_ids, lps):
        s = decode(tid)
        chosen = d.get(tid)
        tokens.append(s)
        token_lps.append(_finite(chosen.logprob) if chosen is not None else None)
        tops.append({decode(k): _finite(v.logprob) for k, v in d.items()})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(token_ids: Sequence[int], lps: Sequence[dict] | None, top_n: int,
                  decode: TokenDecoder) -> list[dict[str, Any]] | None:
    if lps is None:
        return None
    content = []
    for tid, d in zip(token_ids, lps):
        s = decode(tid)
        chosen = d.get(tid)
        top = sorted(d.values(), key=lambda lp: -lp.logprob)[:top_n]
        content.append({
            "token": s,
            "logprob": _finite(chosen.logprob) if chosen is not None else -9999.0,
            "bytes": list(s.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := decode(lp.token_id)), "logprob": _finite(lp.logprob), "bytes": list(t.encode("utf-8"))}
                for lp in top
            ],
        })
    return content


# ------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish(o: CompletionOutput) -> str | None:
    r = o.finish_reason
    return "stop" if r == "abort" else r


@dataclass
class ResponseBuilder:
    """Turns the outputs of one API request (one engine request per prompt) into OpenAI JSON."""

    kind: str  # "chat" | "completion"
    model: str
    request_id: str
    num_prompts: int
    n: int
    params: SamplingParams
    decode: TokenDecoder | None = None
    top_logprobs: int = 0
    echo: bool = False
    include_usage: bool = False
    infos: list[PromptInfo] = field(default_factory=list)
    tools: Any = None  # llmcore.server.tools.ToolCalling: parse replies into tool_calls
    created: int = field(default_factory=lambda: int(time.time()))
    # streaming state, keyed by choice index
    _sent_text: dict[int, int] = field(default_factory=dict)
    _sent_tokens: dict[int, int] = field(default_factory=dict)
    _text_offset: dict[int, int] = field(default_factory=dict)
    _done: set[int] = field(default_factory=set)
    _hold: int = 0

    def __post_init__(self) -> None:
        self._hold = holdback(self.params)

    # ---- whole responses

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        prompt_tokens = sum(len(f.prompt_token_ids) for f in finals)
        completion_tokens = sum(len(o.token_ids) for f in finals for o in f.outputs)
        choices = []
        for pi, final in enumerate(finals):
            for o in sorted(final.outputs, key=lambda o: o.index):
                idx = pi * self.n + o.index
                if self.kind == "chat":
                    lp = None
                    if o.logprobs is not None and self.decode is not None:
                        lp = {"content": chat_logprobs(o.token_ids, o.logprobs, self.top_logprobs, self.decode)}
                    message, finish = {"role": "assistant", "content": o.text}, _finish(o)
                    if self.tools is not None:
                        message, finish = self.tools.message(o.text, finish)
                    choices.append({"index": idx, "message": message, "logprobs": lp, "finish_reason": finish})
                else:
                    prefix = (self.infos[pi].prompt_text or "") if self.echo else ""
                    lp = None
                    if o.logprobs is not None and self.decode is not None:
                        lp, _ = completion_logprobs(o.token_ids, o.logprobs, self.decode)
                    choices.append({"index": idx, "text": prefix + o.text, "logprobs": lp,
                                    "finish_reason": _finish(o)})
        choices.sort(key=lambda c: c["index"])
        return {
            "id": self.request_id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": None,
        }

    # ---- streaming

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        d = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if self.include_usage:
            d["usage"] = None
        return d

    def start_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open with the assistant role for every choice; completions with echo send the prompt."""
        if self.kind == "chat":
            return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(self.num_prompts * self.n)])]
        if self.echo:
            return [self._chunk([{"index": pi * self.n + j, "text": self.infos[pi].prompt_text or "",
                                  "logprobs": None, "finish_reason": None}
                                 for pi in range(self.num_prompts) for j in range(self.n)])]
        return []

    def delta_chunk(self, prompt_index: int, out: RequestOutput) -> dict[str, Any] | None:
        """The chunk carrying what is new in ``out`` (None if nothing to send yet)."""
        choices = []
        for o in out.outputs:
            idx = prompt_index * self.n + o.index
            if idx in self._done:
                continue
            sent_t = self._sent_text.get(idx, 0)
            sent_k = self._sent_tokens.get(idx, 0)
            hold = 0 if o.finished else self._hold
            end = max(len(o.text) - hold, sent_t)
            text = o.text[sent_t:end]
            new_ids = o.token_ids[sent_k:]
            new_lps = o.logprobs[sent_k:] if o.logprobs is not None else None
            self._sent_text[idx] = end
            self._sent_tokens[idx] = len(o.token_ids)
            finish = _finish(o)
            if finish is not None:
                self._done.add(idx)
            if not text and finish is None and not (new_lps and self.decode):
                continue
            if self.kind == "chat":
                lp = None
                if new_lps is not None and self.decode is not None:
                    lp = {"content": chat_logprobs(new_ids, new_lps, self.top_logprobs, self.decode)}
                delta = {"content": text} if text or finish is None else {}
                if self.tools is not None:
                    delta, finish = self.tools.delta(idx, text, finish)
                    if not delta and finish is None and lp is None:
                        continue
                choices.append({"index": idx, "delta": delta, "logprobs": lp, "finish_reason": finish})
            else:
                lp = None
                if new_lps is not None and self.decode is not None:
                    lp, self._text_offset[idx] = completion_logprobs(
                        new_ids, new_lps, self.decode, self._text_offset.get(idx, 0))
                choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": finish})
        if not choices:
            return None
        return self._chunk(choices)

    def usage_chunk(self, finals: list[RequestOutput | None]) -> dict[str, Any]:
        prompt_tokens = sum(len(f.prompt_token_ids) for f in finals if f is not None)
        completion_tokens = sum(len(o.token_ids) for f in finals if f is not None for o in f.outputs)
        d = self._chunk([])
        d["usage"] = usage(prompt_tokens, completion_tokens)
        return d


def sse(obj: Any) -> str:
    if isinstance(obj, str):
        return f"data: {obj}\n\n"
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"
