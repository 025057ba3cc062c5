"""Constraint -> compiled grammar, with xgrammar, once per distinct constraint.

Why xgrammar (benchmarks/grammar_mask_bench.py, SmolLM2's 49,152-token vocabulary, a 2-core CPU
under load): its token mask takes ~2-4 us per sequence (p50) against ~17-29 us for llguidance,
and ~0.1 ms for a 64-sequence step against ~5-8 ms, because it precomputes most of the mask per
grammar at compile time. That compile (~20-40 ms for a JSON schema, against ~1-2 ms) runs once
per distinct constraint (cached here) and off the engine's step loop where the caller allows it
(the server compiles in a worker thread before the request reaches the engine).

xgrammar is an optional dependency (the ``serve`` extra): it is imported on first use, and a
constrained request without it is refused with the command that installs it.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from typing import Any

from llmcore.errors import RequestError
from llmcore.structured.spec import OPTION, StructuredOutput

CACHE_SIZE = 256  # compiled grammars kept (a JSON-schema grammar is ~0.1-2 MB)
_LARK_START = re.compile(r"^\s*\??start\s*:", re.M)
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[12:00:00] /path/file.cc:94: "


def import_xgrammar():
    try:
        import xgrammar  # optional: the grammar library behind structured output
    except ImportError as exc:
        raise RequestError(
            OPTION, "...", f"needs the xgrammar package, which is not installed ({exc})",
            "pip install 'llmcore[serve]' (or pip install xgrammar)",
        ) from exc
    return xgrammar


def library_message(exc: BaseException) -> str:
    """xgrammar's error text without its time stamp and source location."""
    return _XGR_PREFIX.sub("", str(exc).strip()).strip()


class GrammarCompiler:
    """Compiles :class:`StructuredOutput` s for one tokenizer; thread-safe, LRU-cached by constraint.

    The tokenizer tables (~1 s for a 50k vocabulary) are built on the first constrained request,
    so engines that never see one pay nothing.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler = None
        self._xgr = None
        self._max_token_bytes = 0
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _xgr_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = import_xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(
                    self.hf_tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
                self._max_token_bytes = max(len(b) for b in info.decoded_vocab)
                self._compiler = xgr.GrammarCompiler(info, max_threads=4, cache_enabled=False)
                self._xgr = xgr
            return self._compiler

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar for ``spec``; a bad constraint is a :class:`RequestError` naming it."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                self.hits += 1
                return hit
        compiler = self._xgr_compiler()
        form = spec.form
        try:
            if form in ("json", "json_object"):
                # compact separators, no free whitespace: a small model cannot wander into
                # endless newlines, and the text is what json.dumps writes
                grammar = self._xgr.Grammar.from_json_schema(spec.text, any_whitespace=False,
                                                             strict_mode=spec.strict and form == "json")
                compiled = compiler.compile_grammar(_valid_json_string_chars(str(grammar)))
            elif form == "regex":
                compiled = compiler.compile_regex(spec.text)
            elif form == "choice":
                compiled = compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
            elif _LARK_START.search(spec.text) and "::=" not in spec.text:
                compiled = compiler.compile_lark(spec.text)
            else:
                compiled = compiler.compile_grammar(spec.text)
        except (RuntimeError, ValueError) as exc:
            raise RequestError(f"{OPTION}.{form}", _short(spec.text), _problem(form, library_message(exc)),
                               _FIXES[form]) from exc
        with self._lock:
            self.misses += 1
            self._cache[spec.key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def check_fits(self, spec: StructuredOutput, max_tokens: int) -> None:
        """Refuse a regex or choice whose shortest match cannot be written in ``max_tokens`` tokens.

        A token spells at most ``max_token_bytes`` bytes of text, so a match of L bytes needs at
        least ceil(L / max_token_bytes) tokens. Other forms are not checked (their shortest
        output is rarely the problem).
        """
        if spec.form == "choice":
            need = min(len(c.encode()) for c in spec.choice)
        elif spec.form == "regex":
            need = _regex_min_chars(spec.text)
        else:
            return
        self._xgr_compiler()
        tokens = math.ceil(need / max(self._max_token_bytes, 1))
        if tokens > max_tokens:
            raise RequestError(
                f"{OPTION}.{spec.form}", _short(spec.text),
                f"cannot match anything within max_tokens={max_tokens}: its shortest match is {need} "
                f"characters, at least {tokens} tokens",
                f"Raise max_tokens to at least {tokens} or shorten the {spec.form}",
            )


# xgrammar 0.2's rule for the characters of a length-bounded JSON string lets raw control
# characters (U+0000-U+001F) through, which JSON forbids (json.loads refuses them); its unbounded
# string rule excludes them. Both rules accept the UTF-8 encoding of a surrogate (U+D800-U+DFFF,
# e.g. bytes ED BF BA), which is not UTF-8: the text decodes it as three U+FFFD, so a string
# xgrammar counted as maxLength 5 came out 7 characters long (a byte-level model, sampling). The
# one character class for both: no control characters, no surrogates.
_BOUNDED_STRING_CHARS = r'[^\"\\\r\n]'
_UNBOUNDED_STRING_CHARS = r'[^\0-\x1f\"\\\r\n]'
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\\uD800-\uDFFF]'


def _valid_json_string_chars(ebnf: str) -> str:
    return ebnf.replace(_BOUNDED_STRING_CHARS, _JSON_STRING_CHARS).replace(_UNBOUNDED_STRING_CHARS,
                                                                           _JSON_STRING_CHARS)


def _regex_min_chars(regex: str) -> int:
    """The shortest match's length in characters by Python's regex parser (0 when it cannot tell)."""
    try:
        parser = re._parser  # the parser behind re.compile (3.11+)
    except AttributeError:  # Python 3.10
        import sre_parse as parser  # optional: only on Python 3.10
    try:
        return int(parser.parse(regex).getwidth()[0])
    except Exception:  # a dialect difference: xgrammar alone decides
        return 0


def _problem(form: str, message: str) -> str:
    if form in ("json", "json_object"):
        return f"is not a JSON schema llmcore can enforce: {message}"
    return f"was refused by the grammar compiler: {message}"


_FIXES = {
    "json": "Check the schema (types, $ref targets, bounds); see docs/structured_output.md for what is supported",
    "json_object": "",
    "regex": "Use a regular expression without lookaround or backreferences",
    "choice": "",
    "grammar": 'Use GBNF with a rule named root (root ::= "a" | "b"), or Lark with a rule named start',
}


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
