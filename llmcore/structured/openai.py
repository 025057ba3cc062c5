"""OpenAI and vLLM request fields -> one :class:`StructuredOutput`.

Accepted (at most one of them per request):

- OpenAI ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}``.
- vLLM's ``structured_outputs`` object: ``{"json": schema}``, ``{"regex": ...}``,
  ``{"choice": [...]}``, ``{"grammar": ...}``, ``{"json_object": true}``.
- vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
  (``guided_decoding_backend`` is accepted when it names xgrammar or auto).

A bad value is a :class:`~llmcore.errors.RequestError` whose option is the request's field
(``response_format.json_schema.schema``, ``guided_regex``...); the aliases returned with the
constraint map the engine's later errors (a schema the compiler refuses) to that field too.
"""

from __future__ import annotations

from typing import Any

from llmcore.errors import ConfigError, RequestError
from llmcore.structured.spec import OPTION, StructuredOutput

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
SO_FIELDS = ("json", "regex", "choice", "grammar", "json_object")
BACKENDS = (None, "", "auto", "xgrammar")


def constraint_from_request(req: Any) -> tuple[StructuredOutput | None, dict[str, str]]:
    """The request's constraint (or None) and engine-option -> request-field aliases for its errors."""
    sources: list[tuple[str, dict[str, Any], bool, dict[str, str]]] = []  # (field, forms, strict, aliases)
    rf = getattr(req, "response_format", None)
    if rf is not None:
        got = _response_format(rf)
        if got is not None:
            sources.append(("response_format", *got))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        sources.append(("structured_outputs", *_structured_outputs(so)))
    guided = {k: getattr(req, k, None) for k in GUIDED}
    guided = {k: v for k, v in guided.items() if v is not None}
    if guided:
        forms = {GUIDED[k]: v for k, v in guided.items()}
        aliases = {f"{OPTION}.{GUIDED[k]}": k for k in guided}
        if len(guided) > 1:
            raise RequestError(sorted(guided)[1], "...", f"conflicts with {sorted(guided)[0]}",
                               "Send one guided_* field per request")
        sources.append((next(iter(guided)), forms, True, aliases))
    backend = getattr(req, "guided_decoding_backend", None)
    if backend not in BACKENDS:
        raise RequestError("guided_decoding_backend", backend, "is not available",
                           "llmcore decodes with xgrammar: omit it or use 'xgrammar'")
    if not sources:
        return None, {}
    if len(sources) > 1:
        raise RequestError(sources[1][0], "...", f"conflicts with {sources[0][0]}",
                           "Constrain the output with one of response_format, structured_outputs, guided_*")
    field, forms, strict, aliases = sources[0]
    try:
        spec = StructuredOutput(**forms, strict=strict)
    except ConfigError as exc:
        raise RequestError(aliases.get(exc.option, field), exc.value, exc.problem, exc.hint) from exc
    aliases.setdefault(OPTION, field)
    return spec, aliases


def _response_format(rf: Any) -> tuple[dict[str, Any], bool, dict[str, str]] | None:
    if not isinstance(rf, dict):
        raise RequestError("response_format", rf, "must be an object",
                           'e.g. {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}')
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}, False, {f"{OPTION}.json_object": "response_format"}
    if kind != "json_schema":
        raise RequestError("response_format.type", kind, "is not supported",
                           "Use 'text', 'json_object' or 'json_schema'")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise RequestError("response_format.json_schema", js, "must be an object with a 'schema'",
                           '{"name": "person", "schema": {"type": "object", ...}, "strict": true}')
    schema = js.get("schema")
    if schema is None:
        raise RequestError("response_format.json_schema.schema", None, "is missing",
                           "Put the JSON schema under response_format.json_schema.schema")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError("response_format.json_schema.strict", strict, "must be true or false")
    field = "response_format.json_schema.schema"
    return {"json": schema}, bool(strict), {f"{OPTION}.json": field, f"{OPTION}.strict": field}


def _structured_outputs(so: Any) -> tuple[dict[str, Any], bool, dict[str, str]]:
    if not isinstance(so, dict):
        raise RequestError("structured_outputs", so, "must be an object",
                           'e.g. {"json": {...}}, {"regex": "..."}, {"choice": [...]}, {"grammar": "..."}')
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    unknown = sorted(set(given) - set(SO_FIELDS))
    if unknown:
        raise RequestError(f"structured_outputs.{unknown[0]}", given[unknown[0]], "is not supported by llmcore",
                           f"Use one of {', '.join(SO_FIELDS)}")
    forms = {k: v for k, v in given.items()}
    return forms, True, {f"{OPTION}.{k}": f"structured_outputs.{k}" for k in SO_FIELDS}
