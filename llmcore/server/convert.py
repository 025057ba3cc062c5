"""Request conversion: an OpenAI request in, :class:`SamplingParams` and engine ``prepare`` functions out.

Each request value is checked once, where it enters: its JSON type and range by the pydantic
models of :mod:`llmcore.server.protocol`; what llmcore does not support, the sampling values and
the message contents by :func:`sampling_params` / :func:`chat_messages` here; how the prompt and
``max_tokens`` fit the context window by the ``prepare`` function, on the engine thread, once
the prompt is tokenized. Every refusal is an :class:`ApiError` naming the API parameter.

No web framework here: the HTTP routes and ``llmcore batch`` share it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from llmcore.errors import ConfigError, RequestError
from llmcore.sampling_params import SamplingParams
from llmcore.server.errors import ApiError, ContextLengthError, config_error_to_api, unsupported
from llmcore.server.protocol import MAX_BATCH_INPUTS, MAX_STOP, ChatCompletionRequest, CompletionRequest
from llmcore.structured.openai import constraint_from_request

MIN_TEMPERATURE = 1e-5
#: tokens a chat request generates when it sets neither max_tokens nor max_completion_tokens
DEFAULT_CHAT_MAX_TOKENS = 512
#: OpenAI's default for /v1/completions
DEFAULT_COMPLETION_MAX_TOKENS = 16


@dataclass(slots=True)
class Converted:
    """A request's sampling settings, ready for the engine."""

    params: SamplingParams
    #: True when the client set max_tokens: a prompt + max_tokens past the context is refused.
    #: False: the default applies and shrinks to what the context has left.
    max_tokens_given: bool
    aliases: dict[str, str]  # engine option name -> API parameter name, for error messages


def check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.logit_bias:
        raise unsupported("logit_bias", "a non-empty logit_bias")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} stop strings are allowed, got {len(req.stop)}",
                       param="stop", code="invalid_value")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise unsupported("suffix", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise unsupported("best_of", "best_of different from n")
        if req.echo and req.logprobs is not None:
            raise unsupported("echo", "echo together with logprobs")
    else:
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: requires logprobs=true", param="top_logprobs", code="invalid_value")


def sampling_params(req: CompletionRequest | ChatCompletionRequest,
                    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> Converted:
    """Check what llmcore cannot do and build the request's :class:`SamplingParams`.

    :param default_max_tokens: a chat request's ``max_tokens`` when it sets none (the server's
        ``--default-max-tokens``); completions default to 16, as OpenAI's.
    """
    check_unsupported(req)
    aliases: dict[str, str] = {}
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # OpenAI accepts 0: only the most likely token
        temperature, top_p = 0.0, 1.0
    if temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow; this close to 0 is greedy anyway
        temperature = 0.0
    if isinstance(req, ChatCompletionRequest):
        given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.max_completion_tokens is not None:
            aliases["max_tokens"] = "max_completion_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        aliases["logprobs"] = "top_logprobs"
        aliases["prompt"] = "messages"
    else:
        given = DEFAULT_COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        logprobs = req.logprobs
        aliases["prompt_token_ids"] = "prompt"
    try:
        structured, structured_aliases = constraint_from_request(req)
        aliases.update(structured_aliases)
        params = SamplingParams(
            max_tokens=default_max_tokens if given is None else given,
            temperature=temperature,
            top_p=top_p,
            top_k=max(req.top_k or 0, 0),
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
            exc = ConfigError("min_tokens", req.min_tokens,
                              f"must be <= max_tokens (the server's default, {default_max_tokens})",
                              "Set max_tokens as well")
        raise config_error_to_api(exc, aliases) from exc
    return Converted(params, given is not None, aliases)


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
    """The messages as the chat template takes them; refuses a message without content.

    ``content: null`` is OpenAI's form for an assistant message that only calls tools, so only an
    assistant message may have it (read as empty text). ``tool_calls`` and ``tool_call_id`` pass
    through to the chat template (:mod:`llmcore.server.tools` rewrites them for templates without tools).
    """
    msgs = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            content = "\n".join(part.text for part in m.content)
        elif m.content is None and m.role != "assistant":
            param = f"messages[{i}].content"
            raise ApiError(400, f"Invalid value for '{param}': a {m.role} message needs content (a string or a "
                           "list of text parts), got null.", param=param, code="invalid_value")
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


def _tokenize(engine: Any, source: str | list[int] | list[dict[str, Any]], chat: bool,
              tools: list[dict[str, Any]] | None = None) -> tuple[list[int], str | None]:
    tok = engine.tokenizer
    if chat:
        try:
            text = tok.apply_chat_template(source, tools=tools)
        except ConfigError:
            raise
        except Exception as exc:  # jinja errors from the model's template
            raise RequestError("messages", "...", f"the model's chat template rejected them: {exc}") from exc
        return tok.encode(text), text
    if isinstance(source, str):
        return tok.encode(source), source
    return list(source), None


def make_prepare(
    source: str | list[int] | list[dict[str, Any]],
    converted: Converted,
    *,
    chat: bool,
    info: PromptInfo,
    want_prompt_text: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> Callable[[Any], tuple[list[int], SamplingParams]]:
    """A function run on the engine thread: render/tokenize, check the context fits, fix max_tokens.

    :param tools: the functions the chat template is given (see :func:`llmcore.server.structured.chat_tools`).
    """
    prompt_param = "messages" if chat else "prompt"

    def prepare(engine: Any) -> tuple[list[int], SamplingParams]:
        ids, text = _tokenize(engine, source, chat, tools)
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
        p = dataclasses.replace(converted.params)
        if not converted.max_tokens_given:
            p.max_tokens = min(p.max_tokens, limit - n)
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
            info.prompt_text = text if text is not None else engine.tokenizer.decode(ids)
        return ids, p

    return prepare
