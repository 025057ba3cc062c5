"""The server's structured-output and tool-calling steps, called by the routes.

- :func:`chat_tools`: a chat request's tools -> the messages and ``tools`` for the chat
  template, and the decoding constraint ``tool_choice`` forces.
- :func:`precompile`: compile the request's constraint in a worker thread, before the request
  reaches the engine, so a new schema never stalls the engine's step loop (the engine finds it
  in its cache).

Errors are OpenAI-style 400s naming the request field.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from llmcore.errors import ConfigError, RequestError
from llmcore.server.convert import Converted
from llmcore.server.errors import config_error_to_api
from llmcore.server.tools import ToolCalling


def template_text(tokenizer: Any) -> str | None:
    """The model's chat template source (all named templates, joined), or None."""
    t = getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    if isinstance(t, dict):
        return "\n".join(str(v) for v in t.values())
    return t


def chat_tools(
    body: Any, messages: list[dict[str, Any]], conv: Converted, tokenizer: Any, parser: str | None = None,
) -> tuple[ToolCalling | None, list[dict[str, Any]], list[dict[str, Any]] | None, Converted]:
    """``(tool calling or None, messages, tools for the template, converted)`` for a chat request.

    A forced tool call (``tool_choice`` "required" or a named function) comes back as the
    constraint of the returned :class:`Converted`; ``conv.aliases`` gains its field names.
    """
    try:
        tc = ToolCalling.from_request(body, template_text(tokenizer), parser)
        if tc is None:
            return None, messages, None, conv
        spec, extra = tc.constraint()
        if spec is not None:
            if conv.params.structured_output is not None:
                raise RequestError("tool_choice", body.tool_choice,
                                   "forces a tool call, which conflicts with the requested output format",
                                   "Drop response_format (or the guided_*/structured_outputs field), or use "
                                   "tool_choice 'auto'")
            conv = dataclasses.replace(conv, params=dataclasses.replace(conv.params, structured_output=spec))
            conv.aliases.update(extra)
        messages, template_tools = tc.prompt(messages)
    except ConfigError as exc:
        raise config_error_to_api(exc, conv.aliases) from exc
    return tc, messages, template_tools, conv


async def precompile(engine: Any, conv: Converted) -> None:
    """Compile the request's constraint (if any) off the event loop and off the engine thread."""
    spec = conv.params.structured_output
    structured = getattr(engine, "structured", None)
    if spec is None or structured is None or not structured.supported:
        return  # nothing to do, or the engine refuses it with its own clear error
    try:
        await asyncio.to_thread(structured.compile, spec)
    except ConfigError as exc:
        raise config_error_to_api(exc, conv.aliases) from exc
