"""Tool calling in chat completions: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

:meth:`ToolCalling.from_request` validates the request's tools (a 400 names the field) and
decides how the reply is produced:

- ``tool_choice: "none"``: the model is not shown the tools and its reply is plain content.
- ``"auto"`` (the default with tools): the chat template receives the tools; the reply is parsed
  for calls in the model family's format (:mod:`llmcore.server.tool_parsers`).
- ``"required"``: decoding is constrained to a JSON list of ``{"name", "arguments"}`` calls whose
  arguments follow each function's ``parameters`` schema (one call unless
  ``parallel_tool_calls``).
- a named function: decoding is constrained to that function's ``parameters`` schema; the reply
  is its arguments. Either way even a small model returns arguments that validate.

A chat template that does not take tools (no ``tools`` in it) gets them as a system message in
the Hermes format instead, and earlier assistant calls as ``<tool_call>`` text, so follow-ups
with ``role: tool`` messages render on any template.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmcore.errors import RequestError
from llmcore.server.tool_parsers import ParsedCall, ToolParser, parser_for
from llmcore.structured.spec import OPTION, StructuredOutput

EMPTY_PARAMETERS = {"type": "object", "properties": {}}
FALLBACK_PROMPT = (
    "You may call functions to answer. The functions are listed in JSON within <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with a JSON object with its name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCalling:
    """The tool settings of one chat request, and the per-choice state of its streamed reply."""

    functions: list[dict[str, Any]]  # each {"name", "description"?, "parameters"}
    choice: str  # "none" | "auto" | "required" | "function"
    parser: ToolParser
    parallel: bool = True
    named: str | None = None  # the forced function's name
    template_has_tools: bool = True
    _streams: dict[int, "_ChoiceStream"] = field(default_factory=dict)

    # ------------------------------------------------------------- request

    @classmethod
    def from_request(cls, req: Any, chat_template: str | None, parser_name: str | None = None
                     ) -> "ToolCalling | None":
        """None when the request has no tools (and no tool_choice that needs them)."""
        tools = req.tools or []
        choice = req.tool_choice
        if not tools:
            if choice not in (None, "none", "auto"):
                raise RequestError("tool_choice", choice, "needs tools", "Send the functions in tools")
            return None
        functions = [_function(i, t) for i, t in enumerate(tools)]
        names = [f["name"] for f in functions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RequestError("tools", dup, "names a function twice", "Give each function a distinct name")
        named = None
        if choice is None:
            choice = "auto"
        elif isinstance(choice, dict):
            named = _named_choice(choice, names)
            choice = "function"
        elif choice not in ("none", "auto", "required"):
            raise RequestError("tool_choice", choice, "is not supported",
                               'Use "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
        try:
            parser = parser_for(parser_name, chat_template)
        except ValueError as exc:
            raise RequestError("tool_call_parser", parser_name, str(exc)) from exc
        parallel = True if req.parallel_tool_calls is None else bool(req.parallel_tool_calls)
        return cls(functions, choice, parser, parallel, named, "tools" in (chat_template or ""))

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def constraint(self) -> tuple[StructuredOutput | None, dict[str, str]]:
        """The decoding constraint ``required`` or a named function needs, with error aliases."""
        if self.choice == "function":
            i, f = next((i, f) for i, f in enumerate(self.functions) if f["name"] == self.named)
            field = f"tools[{i}].function.parameters"
            return StructuredOutput(json=f["parameters"], strict=True), {f"{OPTION}.json": field, OPTION: field}
        if self.choice == "required":
            items = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                      "required": ["name", "arguments"], "additionalProperties": False} for f in self.functions]
            schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                                      "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput(json=schema, strict=True), {f"{OPTION}.json": "tools", OPTION: "tools"}
        return None, {}

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and the ``tools`` argument for the chat template."""
        msgs = [_for_template(m, self.template_has_tools) for m in messages]
        if self.choice == "none":
            return msgs, None
        tools = [{"type": "function", "function": f} for f in self.functions]
        if self.template_has_tools:
            return msgs, tools
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = FALLBACK_PROMPT.format(tools=listing)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{system}"}
        else:
            msgs.insert(0, {"role": "system", "content": system})
        return msgs, None

    # ------------------------------------------------------------ response

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """The reply's content and calls."""
        if self.choice == "none":
            return text, []
        if self.choice == "function":
            return None, [ParsedCall(self.named, _compact(text))]
        if self.choice == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return text, []  # cut short (max_tokens): the text is all there is
            return None, [ParsedCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in items]
        content, calls = self.parser.parse(text)
        if calls and not self.parallel:
            calls = calls[:1]
        return content, calls

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a whole reply, and its finish reason."""
        content, calls = self.parse(text)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [_call_dict(c, new_call_id()) for c in calls]
            finish = _finish_with_calls(self.choice, finish)
        return msg, finish

    def delta(self, index: int, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """The stream delta for choice ``index`` given its new text; may hold text back."""
        st = self._streams.get(index)
        if st is None:
            st = self._streams[index] = _ChoiceStream(self)
        return st.feed(text, finish)


class _ChoiceStream:
    """One choice's streamed reply: content until a call opens, then the calls."""

    def __init__(self, owner: ToolCalling) -> None:
        self.owner = owner
        self.text = ""  # everything received
        self.sent = 0  # characters of content sent
        self.in_calls = False
        self.call_id = new_call_id()
        self.opened = False  # named function: the call's header went out

    def feed(self, new: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        o = self.owner
        self.text += new
        if o.choice == "none":
            return ({"content": new} if new or finish is None else {}), finish
        if o.choice == "function":  # the text is the arguments: stream them as they come
            call: dict[str, Any] = {"index": 0, "function": {"arguments": new}}
            if not self.opened:
                self.opened = True
                call = {"index": 0, "id": self.call_id, "type": "function",
                        "function": {"name": o.named, "arguments": new}}
            return ({"tool_calls": [call]} if new or call.get("id") else {}), finish
        delta: dict[str, Any] = {}
        if not self.in_calls and o.choice == "auto":
            start = o.parser.call_start(self.text)
            end = start if start is not None else len(self.text) - (0 if finish else o.parser.may_start(self.text))
            if end > self.sent:
                delta["content"] = self.text[self.sent:end]
                self.sent = end
            self.in_calls = start is not None
        if finish is not None:
            content, calls = o.parse(self.text)
            if calls:
                delta["tool_calls"] = [{"index": i, **_call_dict(c, new_call_id())} for i, c in enumerate(calls)]
                finish = _finish_with_calls(o.choice, finish)
            elif len(self.text) > self.sent:  # no well-formed call after all: it was content
                delta["content"] = delta.get("content", "") + self.text[self.sent:]
                self.sent = len(self.text)
        return delta, finish


def _call_dict(c: ParsedCall, call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def _finish_with_calls(choice: str, finish: str | None) -> str | None:
    # OpenAI: "tool_calls" when the model chose to call; a forced function ends with "stop"
    if finish == "stop" and choice != "function":
        return "tool_calls"
    return finish


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text  # cut short by max_tokens: returned as generated


def _function(i: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise RequestError(f"{where}.type", tool.get("type") if isinstance(tool, dict) else tool,
                           "is not supported", "Only function tools are: {\"type\": \"function\", \"function\": {...}}")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise RequestError(f"{where}.function", fn, "must be an object with a name")
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise RequestError(f"{where}.function.name", name, "must be a non-empty string of at most 64 characters")
    params = fn.get("parameters")
    if params is None:
        params = EMPTY_PARAMETERS
    if not isinstance(params, dict):
        raise RequestError(f"{where}.function.parameters", params, "must be a JSON schema object")
    out = {"name": name, "parameters": params}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    return out


def _named_choice(choice: dict[str, Any], names: list[str]) -> str:
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise RequestError("tool_choice", choice, "must name a function",
                           '{"type": "function", "function": {"name": "my_function"}}')
    if name not in names:
        raise RequestError("tool_choice.function.name", name, "is not one of the tools",
                           f"Use one of {', '.join(names)}")
    return name


def _for_template(m: dict[str, Any], template_has_tools: bool) -> dict[str, Any]:
    """A message as the chat template takes it: arguments as objects, or as Hermes text."""
    calls = m.get("tool_calls")
    if not calls:
        return m
    out = {k: v for k, v in m.items() if k != "tool_calls"}
    parsed = []
    for c in calls:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        parsed.append({"id": c.get("id"), "type": "function", "function": {"name": fn.get("name"), "arguments": args}})
    if template_has_tools:
        out["tool_calls"] = parsed
        out["content"] = out.get("content") or ""
        return out
    text = "\n".join(
        "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                     ensure_ascii=False) + "\n</tool_call>" for c in parsed)
    out["content"] = ((out.get("content") or "") + "\n" + text).strip()
    return out
