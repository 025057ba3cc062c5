"""What a request asks its output to look like: one constraint, validated on construction.

Plain data (no grammar library here), so it travels inside :class:`~llmcore.SamplingParams` to
any process. :mod:`llmcore.structured.compiler` turns it into a compiled grammar.
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass, field
from typing import Any

from llmcore.errors import ConfigError

FORMS = ("json", "json_object", "regex", "choice", "grammar")
OPTION = "structured_output"


@dataclass(slots=True)
class StructuredOutput:
    """Constrain the generated text to one form. Set exactly one of:

    - ``json``: a JSON schema (a dict, or its JSON text); the output is a JSON value that
      validates against it. ``strict=True`` (the default) also refuses properties the schema
      does not name, as OpenAI's ``strict`` structured outputs do; ``strict=False`` allows them
      where the schema does (JSON Schema's default).
    - ``json_object=True``: any JSON object.
    - ``regex``: the output matches this regular expression in full.
    - ``choice``: the output is exactly one of these strings.
    - ``grammar``: a context-free grammar, in GBNF/EBNF (root rule ``root``, as llama.cpp) or in
      Lark syntax (root rule ``start``).

    The output ends (end-of-sequence allowed) only where the constraint can end.

    >>> StructuredOutput(json={"type": "object", "properties": {"x": {"type": "integer"}}})
    >>> StructuredOutput(choice=["yes", "no"])
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    strict: bool = True
    # the canonical constraint text (schema JSON, regex, grammar), and the cache key built from it
    text: str = field(default="", init=False, repr=False)
    key: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        chosen = [f for f in FORMS if (getattr(self, f) is not None and f != "json_object") or
                  (f == "json_object" and self.json_object)]
        if len(chosen) != 1:
            raise ConfigError(
                OPTION, self._shown(), f"sets {len(chosen)} forms ({', '.join(chosen) or 'none'})",
                f"Set exactly one of {', '.join(FORMS)}",
            )
        if not isinstance(self.strict, bool):
            raise ConfigError(f"{OPTION}.strict", self.strict, "must be true or false")
        form = chosen[0]
        if form == "json":
            self.text = jsonlib.dumps(self._schema(), ensure_ascii=False)
        elif form == "json_object":
            if self.json_object is not True:
                raise ConfigError(f"{OPTION}.json_object", self.json_object, "must be true or false")
            self.text = '{"type": "object"}'
        elif form == "choice":
            self.choice = self._choices()
            self.text = jsonlib.dumps(self.choice, ensure_ascii=False)
        else:
            value = getattr(self, form)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{OPTION}.{form}", value, "must be a non-empty string",
                                  _HINTS[form])
            self.text = value
        self.key = f"{form}:{int(self.strict)}:{self.text}"

    @property
    def form(self) -> str:
        return self.key.split(":", 1)[0]

    def _schema(self) -> dict[str, Any]:
        schema = self.json
        if isinstance(schema, str):
            try:
                schema = jsonlib.loads(schema)
            except ValueError as exc:
                raise ConfigError(f"{OPTION}.json", _short(self.json), f"is not valid JSON: {exc}",
                                  "Pass a JSON schema object") from exc
        if not isinstance(schema, dict):
            raise ConfigError(f"{OPTION}.json", _short(schema), "must be a JSON schema object",
                              'e.g. {"type": "object", "properties": {"name": {"type": "string"}}}')
        try:
            jsonlib.dumps(schema)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{OPTION}.json", _short(schema), f"is not JSON-serializable: {exc}") from exc
        return schema

    def _choices(self) -> list[str]:
        c = self.choice
        if isinstance(c, str) or not isinstance(c, (list, tuple)) or not c:
            raise ConfigError(f"{OPTION}.choice", c, "must be a non-empty list of strings",
                              'e.g. ["positive", "negative"]')
        bad = [x for x in c if not isinstance(x, str) or not x]
        if bad:
            raise ConfigError(f"{OPTION}.choice", bad[:3], "holds entries that are not non-empty strings")
        return list(c)

    def _shown(self) -> dict[str, Any]:
        return {f: _short(getattr(self, f)) for f in FORMS if getattr(self, f) not in (None, False)}

    @classmethod
    def coerce(cls, value: Any) -> "StructuredOutput | None":
        """``value`` as a StructuredOutput: one already, a dict of its fields, or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(FORMS) - {"strict"})
            if unknown:
                raise ConfigError(OPTION, _short(value), f"has unknown keys {unknown}",
                                  f"Use one of {', '.join(FORMS)} (and strict)")
            return cls(**value)
        raise ConfigError(OPTION, _short(value), "must be a StructuredOutput or a dict of its fields",
                          'e.g. StructuredOutput(regex="[0-9]+") or {"choice": ["a", "b"]}')


_HINTS = {
    "regex": 'e.g. "[0-9]{3}-[0-9]{4}"',
    "grammar": 'e.g. root ::= "yes" | "no"',
}


def _short(value: Any, limit: int = 120) -> Any:
    s = repr(value)
    return value if len(s) <= limit else s[: limit - 3] + "..."
