"""Model output -> tool calls, for the formats of the model families llmcore loads.

- ``hermes`` (Qwen2/2.5/3, Hermes, and llmcore's own prompt for templates without tools):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call.
- ``llama3_json`` (Llama 3.1-3.3): a JSON object ``{"name": ..., "parameters": {...}}`` as the
  whole reply (after an optional ``<|python_tag|>``), several separated by ``;``.
- ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (the marker is a special
  token, so the text may start at the ``[`` of the list).

A parser returns the text before the calls as content and the calls as ``(name, arguments
JSON)``. Text that does not hold a well-formed call stays content: a model that wrote half a
call gets its text back, not an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it


class ToolParser:
    name = ""
    # text that opens a call: while streaming, content stops here (and is held back while the
    # text so far could still become one of these)
    markers: tuple[str, ...] = ()
    # True when a call can only open at the start of the reply (no content before it)
    at_start_only = False

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        raise NotImplementedError

    def call_start(self, text: str) -> int | None:
        """Where the first call opens in ``text`` (None if none has yet)."""
        if self.at_start_only:
            stripped = text.lstrip()
            for m in self.markers:
                if stripped.startswith(m):
                    return len(text) - len(stripped)
            return None
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def may_start(self, text: str) -> int:
        """How many trailing characters of ``text`` must be held back: they may begin a marker."""
        if self.at_start_only:
            stripped = text.lstrip()
            return len(text) if any(m.startswith(stripped) for m in self.markers) else 0
        for n in range(min(len(text), max(len(m) for m in self.markers) - 1), 0, -1):
            if any(m.startswith(text[-n:]) for m in self.markers):
                return n
        return 0


def _call(obj: Any, args_keys: tuple[str, ...]) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for k in args_keys:
        if k in obj:
            args = obj[k]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for m in self._block.finditer(text, start):
            try:
                obj, _ = _DECODER.raw_decode(m.group(1))
            except ValueError:
                return text, []
            call = _call(obj, ("arguments", "parameters"))
            if call is None:
                return text, []
            calls.append(call)
        return _content(text[:start]), calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")
    at_start_only = True

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):].lstrip()
        if not body.startswith("{"):
            return text, []
        calls, pos = [], 0
        while pos < len(body):
            try:
                obj, end = _DECODER.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _call(obj, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return None, calls


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    bare = "[{"  # the list itself, at the start of the reply, when the marker was skipped as special

    def call_start(self, text: str) -> int | None:
        i = text.find("[TOOL_CALLS]")
        if i >= 0:
            return i
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith(self.bare) else None

    def may_start(self, text: str) -> int:
        stripped = text.lstrip()
        if self.bare.startswith(stripped):
            return len(text)
        return super().may_start(text)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        start = self.call_start(text)
        if start is None:
            return text, []
        body = text[start:]
        if body.startswith("[TOOL_CALLS]"):
            body = body[len("[TOOL_CALLS]"):]
        try:
            obj, _ = _DECODER.raw_decode(body.strip())
        except ValueError:
            return text, []
        items = obj if isinstance(obj, list) else [obj]
        calls = [_call(o, ("arguments", "parameters")) for o in items]
        if not calls or any(c is None for c in calls):
            return text, []
        return _content(text[:start]), calls


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for(name: str | None, chat_template: str | None) -> ToolParser:
    """The parser named by ``--tool-call-parser``, else the one the model's chat template implies."""
    if name:
        try:
            return PARSERS[name]()
        except KeyError:
            raise ValueError(f"tool call parser {name!r} is not known; available: {', '.join(PARSERS)}") from None
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return MistralParser()
    if "<|python_tag|>" in t or ("ipython" in t and "<|eot_id|>" in t):
        return Llama3JsonParser()
    return HermesParser()
