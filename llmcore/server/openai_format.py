"""OpenAI request/response translation shared by the server and ``llmcore batch``.

No web framework here: request models in, :class:`SamplingParams` and
engine-thread ``prepare`` functions out; engine outputs in, OpenAI response
dicts and stream chunks out.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llmcore.errors import ConfigError, RequestError
from llmcore.outputs import CompletionOutput, RequestOutput
from llmcore.sampling_params import SamplingParams
from llmcore.structured.openai import constraint_from_request
from llmcore.server.protocol import (
    MAX_BATCH_INPUTS,
    MAX_STOP,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    UNION_HINTS,
)


MIN_TEMPERATURE = 1e-5


class ApiError(Exception):
    """An error answered with OpenAI's error object and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _default_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "invalid_request_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ContextLengthError(RequestError):
    """Prompt (plus max_tokens) does not fit the model's context window."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def config_error_to_api(exc: ConfigError, aliases: dict[str, str] | None = None) -> ApiError:
    """Map an engine ``ConfigError``/``RequestError`` to a 400 naming the API parameter."""
    option = exc.option
    param = (aliases or {}).get(option, option)
    msg = str(exc)
    if param != option and msg.startswith(option):
        msg = param + msg[len(option):]
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_value"
    return ApiError(400, msg, param=param, code=code)


# ----------------------------------------------------------------- requests


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
        elif isinstance(item, str) and item.isidentifier() and item not in _TYPE_TAGS and not item[:1].isupper():
            parts.append(item)
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "bytes"}  # pydantic union-member tags


def validation_error_to_api(errors: list[dict[str, Any]]) -> ApiError:
    """Map pydantic validation errors (or a JSON decode error) to a 400 naming the parameter."""
    if not errors:
        return ApiError(400, "invalid request", code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        where = ""
        if len(first.get("loc", ())) > 1:
            where = f" at position {first['loc'][1]}"
        return ApiError(400, f"We could not parse the JSON body of your request{where}: "
                        f"{ctx.get('error', 'invalid JSON')}. The API expects a JSON object.",
                        code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = _param_from_loc(loc)
    if param is None:
        if first.get("type") == "missing":
            return ApiError(400, "The request body is missing; send a JSON object.", code="invalid_request")
        return ApiError(400, f"The request body must be a JSON object: {first.get('msg')}", code="invalid_request")
    top = param.split(".")[0].split("[")[0]
    same = [e for e in errors if (_param_from_loc(tuple(e.get("loc", ()))) or "").split("[")[0] == top]
    if top in UNION_HINTS and len(same) > 1 and param.startswith(top) and "." not in param:
        param = top
        got = None
        for e in same:
            rest = tuple(e.get("loc", ()))
            rest = rest[1:] if rest[:1] == ("body",) else rest
            if len(rest) <= 2:
                got = e.get("input")
                break
        shown = f" (got {json.dumps(got)[:80]})" if got is not None and _jsonable(got) else ""
        msg = f"Invalid value for '{param}': {UNION_HINTS[top]}{shown}."
    elif first.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
        return ApiError(400, msg, param=param, code="unknown_parameter")
    elif first.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'."
        return ApiError(400, msg, param=param, code="missing_required_parameter")
    else:
        got = first.get("input")
        shown = json.dumps(got)[:80] if _jsonable(got) else repr(got)[:80]
        msg = f"Invalid value for '{param}': {first.get('msg')} (got {shown})."
    return ApiError(400, msg, param=param, code="invalid_value")


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{param}: {what} is not supported by llmcore", param=param, code="unsupported_parameter")


def check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.logit_bias:
        raise _unsupported("logit_bias", "a non-empty logit_bias")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} stop strings are allowed, got {len(req.stop)}",
                       param="stop", code="invalid_value")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise _unsupported("suffix", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise _unsupported("best_of", "best_of different from n")
        if req.echo and req.logprobs is not None:
            raise _unsupported("echo", "echo together with logprobs")
    else:
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: requires logprobs=true", param="top_logprobs", code="invalid_value")


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_model_len: int) -> tuple[SamplingParams, int | None, dict[str, str]]:
    """Build SamplingParams; returns (params, max_tokens as given or None, engine->API param aliases)."""
    check_unsupported(req)
    chat = isinstance(req, ChatCompletionRequest)
    aliases: dict[str, str] = {}
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # OpenAI accepts 0: only the most likely token
        temperature, top_p = 0.0, 1.0
    if temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow; this close to 0 is greedy anyway
        temperature = 0.0
    top_k = req.top_k or 0
    if top_k < 0:
        top_k = 0
    if chat:
        given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.max_completion_tokens is not None:
            aliases["max_tokens"] = "max_completion_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        aliases["logprobs"] = "top_logprobs"
        aliases["prompt"] = "messages"
    else:
        given = 16 if req.max_tokens is None else req.max_tokens
        logprobs = req.logprobs
        aliases["prompt_token_ids"] = "prompt"
    try:
        structured, structured_aliases = constraint_from_request(req)
        aliases.update(structured_aliases)
        params = SamplingParams(
            max_tokens=given if given is not None else max(max_model_len, 1),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            n=req.n or 1,
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos),
            min_tokens=req.min_tokens or 0,
            logprobs=logprobs,
            skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            structured_output=structured,
        )
    except ConfigError as exc:
        if given is None and exc.option == "min_tokens":
            exc = ConfigError("min_tokens", req.min_tokens, f"must be <= max_tokens ({max_model_len})")
        raise config_error_to_api(exc, aliases) from exc
    return params, given, aliases


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif p and isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if not prompts:
        raise ApiError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
    if len(prompts) > MAX_BATCH_INPUTS:
        raise ApiError(400, f"prompt: at most {MAX_BATCH_INPUTS} prompts per request, got {len(prompts)}",
                       param="prompt", code="invalid_value")
    return prompts


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    msgs = []
    for m in req.messages:
        if isinstance(m.content, list):
            content = "\n".join(part.text for part in m.content)
        else:
            content = m.content or ""
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": content}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = m.tool_calls
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        msgs.append(d)
    return msgs


@dataclass(slots=True)
class PromptInfo:
    """Filled in on the engine thread by a ``prepare`` function."""

    num_prompt_tokens: int = 0
    prompt_text: str | None = None


def make_prepare(
    source: str | list[int] | list[dict[str, Any]],
    params: SamplingParams,
    *,
    chat: bool,
    max_tokens_given: int | None,
    info: PromptInfo,
    want_prompt_text: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> Callable[[Any], tuple[list[int], SamplingParams]]:
    """A function run on the engine thread: render/tokenize, check lengths, fix max_tokens."""
    prompt_param = "messages" if chat else "prompt"

    def prepare(engine: Any) -> tuple[list[int], SamplingParams]:
        tok = engine.tokenizer
        text: str | None
        if chat:
            try:
                text = tok.apply_chat_template(source, tools=tools)
            except ConfigError:
                raise
            except Exception as exc:  # jinja errors from the model's template
                raise RequestError("messages", "...", f"the model's chat template rejected them: {exc}") from exc
            ids = tok.encode(text)
        elif isinstance(source, str):
            text = source
            ids = tok.encode(source)
        else:
            text = None
            ids = list(source)
        if not ids:
            raise RequestError(prompt_param, "", "encodes to zero tokens", "Pass a non-empty prompt")
        limit = engine.max_model_len
        n = len(ids)
        if n >= limit:
            raise ContextLengthError(
                prompt_param, f"<{n} tokens>",
                f"is {n} tokens but this model's maximum context length is {limit} tokens "
                "(including at least one generated token)",
                "Shorten the prompt",
            )
        p = dataclasses.replace(params)
        if max_tokens_given is None:
            p.max_tokens = limit - n
            if p.min_tokens > p.max_tokens:
                raise RequestError("min_tokens", p.min_tokens,
                                   f"exceeds the {p.max_tokens} tokens left in the context window")
        elif n + p.max_tokens > limit:
            raise ContextLengthError(
                "max_tokens", p.max_tokens,
                f"plus the prompt's {n} tokens exceeds this model's maximum context length ({limit} tokens)",
                f"Use max_tokens <= {limit - n}",
            )
        info.num_prompt_tokens = n
        if want_prompt_text:
            info.prompt_text = text if text is not None else tok.decode(ids)
        return ids, p

    return prepare


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


# ------------------------------------------------------------- embeddings


def embedding_inputs(req: EmbeddingRequest) -> list[str | list[int]]:
    x = req.input
    if isinstance(x, str):
        items: list[Any] = [x]
    elif x and isinstance(x[0], int):
        items = [list(x)]
    else:
        items = list(x)
    if not items:
        raise ApiError(400, "input: must not be empty", param="input", code="invalid_value")
    if len(items) > MAX_BATCH_INPUTS:
        raise ApiError(400, f"input: at most {MAX_BATCH_INPUTS} inputs per request, got {len(items)}",
                       param="input", code="invalid_value")
    for i, it in enumerate(items):
        if (isinstance(it, str) and not it) or (isinstance(it, list) and not it):
            raise ApiError(400, f"input[{i}]: must not be empty", param="input", code="invalid_value")
    return items


def encode_embedding(vec: list[float], fmt: str | None) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
    return vec
