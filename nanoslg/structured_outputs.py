"""Structured outputs: what a request's output must match, in one canonical form for every process.

A request carries ``structured_outputs``, a dict with exactly one key (vLLM's names): ``json`` (a JSON schema, as
its JSON text), ``json_object`` (any JSON object), ``regex``, ``choice`` (one of a list of strings), ``grammar``
(EBNF, xgrammar's dialect of GBNF) or ``structural_tag`` (xgrammar's structural tag, as JSON text). The API edge
builds it from OpenAI's ``response_format`` and ``tool_choice`` and checks that xgrammar can build the grammar
(``check``, tokenizer-free and fast); the sampling workers compile it against the vocabulary (``compile_with``).

JSON is generated compact (no free whitespace between tokens): a model may not pad its output with whitespace
forever, which under a grammar that allows any amount of it is a common way for small models never to finish.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
# xgrammar's own errors begin with a timestamp, a C++ source location and an assertion: the user needs the rest
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


class GrammarError(ValueError):
    """The structured output cannot be built: an invalid or unsupported schema, regex or grammar."""


def normalize(spec: Any) -> Optional[dict[str, Any]]:
    """The canonical form of a request's structured_outputs (None for none); raises ValueError naming what is
    wrong with its shape. A schema given as an object becomes its JSON text (key order kept: properties are
    generated in the schema's order)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError("structured_outputs must be an object with one of the keys " + ", ".join(KINDS))
    given = {k: v for k, v in spec.items() if v is not None and v is not False}
    unknown = set(given) - set(KINDS)
    if unknown:
        raise ValueError(f"structured_outputs: unknown key(s) {', '.join(sorted(unknown))}; expected one of "
                         + ", ".join(KINDS))
    if len(given) != 1:
        raise ValueError("structured_outputs must set exactly one of " + ", ".join(KINDS))
    (kind, value), = given.items()
    if kind == "json":
        if isinstance(value, (dict, bool)):
            value = json.dumps(value)
        if not isinstance(value, str):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)")
    elif kind == "json_object":
        if value is not True:
            raise ValueError("structured_outputs.json_object must be true")
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
    elif kind == "structural_tag" and isinstance(value, dict):
        value = json.dumps(value)
    elif not isinstance(value, str) or not value:
        raise ValueError(f"structured_outputs.{kind} must be a non-empty string")
    return {kind: value}


def cache_key(spec: dict[str, Any]) -> str:
    """One string per distinct grammar: compiled grammars are cached and shared under it."""
    return json.dumps(spec, separators=(",", ":"))


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are valid EBNF literals in xgrammar's dialect (same escapes); non-ASCII stays as is (an
    # escaped surrogate pair would be read as two code points)
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _clean(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _CPP_PREFIX.sub("", text).strip()


def _build(spec: dict[str, Any], target: Any) -> Any:
    """Calls target's builder for spec's kind: xgrammar's Grammar (check) or a GrammarCompiler (compile)."""
    (kind, value), = spec.items()
    compiling = not isinstance(target, type)
    if kind == "json":
        fn = target.compile_json_schema if compiling else target.from_json_schema
        return fn(value, any_whitespace=False, strict_mode=True)
    if kind == "json_object":  # any object: not strict, or an object schema would allow only {}
        fn = target.compile_json_schema if compiling else target.from_json_schema
        return fn('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if kind == "regex":
        return (target.compile_regex if compiling else target.from_regex)(value)
    if kind == "structural_tag":
        return (target.compile_structural_tag if compiling else target.from_structural_tag)(value)
    ebnf = _choice_ebnf(value) if kind == "choice" else value
    return (target.compile_grammar if compiling else target.from_ebnf)(ebnf)


def check(spec: dict[str, Any]) -> None:
    """Raises GrammarError when xgrammar cannot build spec's grammar (no vocabulary needed: milliseconds for
    common schemas; callers on an event loop run it in a thread all the same)."""
    import xgrammar

    (kind, _), = spec.items()
    try:
        _build(spec, xgrammar.Grammar)
    except Exception as e:
        raise GrammarError(f"invalid {_NAMES[kind]}: {_clean(e)}") from None


def compile_with(compiler: Any, spec: dict[str, Any]) -> Any:
    """spec compiled by an xgrammar GrammarCompiler (which caches by its input); GrammarError on failure."""
    (kind, _), = spec.items()
    try:
        return _build(spec, compiler)
    except Exception as e:
        raise GrammarError(f"invalid {_NAMES[kind]}: {_clean(e)}") from None


_NAMES = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
          "grammar": "grammar", "structural_tag": "structural tag"}
