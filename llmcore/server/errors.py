"""Errors answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

No web framework here: :class:`ApiError` is raised by request conversion, admission and the
engine bridge; the HTTP app (and ``llmcore batch``, and any other front end) turns it into a
response. :func:`config_error_to_api` and :func:`validation_error_to_api` map the engine's and
pydantic's errors to a 400 that names the API parameter.
"""

from __future__ import annotations

import json
from typing import Any

from llmcore.errors import ConfigError, RequestError
from llmcore.server.protocol import UNION_HINTS

_TYPE_TAGS = {"str", "int", "float", "bool", "bytes"}  # pydantic union-member tags


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
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{param}: {what} is not supported by llmcore", param=param, code="unsupported_parameter")


class ContextLengthError(RequestError):
    """Prompt (plus max_tokens) does not fit the model's context window."""


def config_error_to_api(exc: ConfigError, aliases: dict[str, str] | None = None) -> ApiError:
    """Map an engine ``ConfigError``/``RequestError`` to a 400 naming the API parameter."""
    option = exc.option
    param = (aliases or {}).get(option, option)
    msg = str(exc)
    if param != option and msg.startswith(option):
        msg = param + msg[len(option):]
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_value"
    return ApiError(400, msg, param=param, code=code)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
        elif isinstance(item, str) and item.isidentifier() and item not in _TYPE_TAGS and not item[:1].isupper():
            parts.append(item)
    return ".".join(parts) or None


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


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
