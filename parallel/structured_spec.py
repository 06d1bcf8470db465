"""What a structured-output request asks for: a frozen, hashable ``StructuredSpec`` on ``SamplingParams``.

One of vLLM's ``StructuredOutputsParams`` kinds: ``json`` (a JSON schema), ``json_object`` (any JSON object),
``regex``, ``choice`` (one of a few strings) or ``grammar`` (EBNF or Lark, as xgrammar reads them). Every
size is bounded here, before any grammar library sees the spec (a schema's nesting as vLLM bounds it), so
a hostile spec is a 400 naming its field (``param``: the request field it came from, e.g.
``response_format``), never a stalled or crashed engine. Equal specs are equal keys (``param`` aside): the
grammar compiled for one serves every request that asks for the same thing. Compiling and matching live in
``parallel/structured.py``; this module imports nothing heavy, so the ingress builds specs cheaply.

Example:
    >>> spec = StructuredSpec.from_options({"json": {"type": "object", "properties": {"ok": {"type": "boolean"}}}})
    >>> spec.kind, spec.value
    ('json', '{"type":"object","properties":{"ok":{"type":"boolean"}}}')
    >>> spec == StructuredSpec("json", '{"type": "object", "properties": {"ok": {"type": "boolean"}}}')
    True
    >>> StructuredSpec("regex", "a" * 20_000)
    Traceback (most recent call last):
    parallel.errors.InvalidRequestError: structured_outputs.regex must be at most 16384 characters
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from parallel.errors import InvalidRequestError

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema, as compact JSON
MAX_NESTING = 64  # objects and arrays in a schema (vLLM's MAX_STRUCTURED_OUTPUT_JSON_NESTING)
MAX_REGEX_CHARS = 16 * 1024
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024


def _depth(value: Any) -> int:
    """How deep objects and arrays nest (iteratively: a deep value must not exhaust Python's stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


@dataclass(frozen=True)
class StructuredSpec:
    """One output constraint. ``value``: the schema as compact JSON (kind ``json``), the regex or the grammar;
    ``choices`` for kind ``choice``. ``param`` names the request field in errors and is not part of the key.

    Example:
        >>> StructuredSpec.from_options({"choice": ["yes", "no"]}, param="guided_choice").choices
        ('yes', 'no')
    """

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise self._bad(f"must be one of {', '.join(KINDS)}, got {str(self.kind)[:32]!r}", "")
        if not isinstance(self.value, str):
            raise self._bad("must be a string")
        object.__setattr__(self, "choices", tuple(self.choices) if isinstance(self.choices, list | tuple)
                           else self.choices)
        if self.kind == "json":
            object.__setattr__(self, "value", self._schema_text(self.value))
        elif self.kind == "regex":
            if len(self.value) > MAX_REGEX_CHARS:
                raise self._bad(f"must be at most {MAX_REGEX_CHARS} characters")
            if "\x00" in self.value:  # never meaningful in a pattern, and not handled by the regex converter
                raise self._bad("must not contain a NUL character")
        elif self.kind == "grammar":
            if not self.value.strip() or len(self.value.encode()) > MAX_GRAMMAR_BYTES:
                raise self._bad(f"must be a non-empty grammar of at most {MAX_GRAMMAR_BYTES} bytes")
        elif self.kind == "choice":
            c = self.choices
            if (not isinstance(c, tuple) or not 0 < len(c) <= MAX_CHOICES
                    or any(not isinstance(s, str) or not s or len(s) > MAX_CHOICE_CHARS for s in c)):
                raise self._bad(f"must be 1 to {MAX_CHOICES} non-empty strings of at most {MAX_CHOICE_CHARS} "
                                "characters")
        if self.kind != "choice" and self.choices:
            raise self._bad("choices belong to kind 'choice' only", "")
        if self.kind == "json_object" and self.value:
            raise self._bad("takes no value", "")

    def _bad(self, message: str, sub: str | None = None) -> InvalidRequestError:
        name = self.param if sub == "" or self.param != "structured_outputs" else f"{self.param}.{self.kind}"
        return InvalidRequestError(f"{name} {message}", param=self.param, code="invalid_value")

    def _schema_text(self, text: str) -> str:
        if len(text.encode()) > 4 * MAX_SCHEMA_BYTES:  # whitespace aside, it cannot fit: do not even parse it
            raise self._bad(f"must be at most {MAX_SCHEMA_BYTES} bytes as compact JSON")
        try:
            schema = json.loads(text)
        except (ValueError, RecursionError):
            raise self._bad("must be a JSON schema (an object or a boolean) in valid JSON") from None
        return self._compact(schema)

    def _compact(self, schema: Any) -> str:
        if not isinstance(schema, dict | bool):
            raise self._bad("must be a JSON schema (an object or a boolean)")
        if _depth(schema) > MAX_NESTING:
            raise self._bad(f"nests objects and arrays more than {MAX_NESTING} levels deep")
        # Key order is kept: a schema's property order is the order the output writes them in.
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise self._bad(f"must be at most {MAX_SCHEMA_BYTES} bytes as compact JSON")
        return text

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str, param: str = "structured_outputs") -> StructuredSpec:
        """A spec from a schema as a dict (or JSON text), without a round trip through text for the dict."""
        if isinstance(schema, str):
            return cls("json", schema, param=param)
        probe = cls("json", "{}", param=param)  # names the field in the errors of _compact
        return cls("json", probe._compact(schema), param=param)

    @classmethod
    def from_options(cls, options: dict[str, Any], param: str = "structured_outputs") -> StructuredSpec:
        """From vLLM's ``structured_outputs`` shape: exactly one of json, json_object, regex, choice, grammar
        (``disable_any_whitespace`` and ``whitespace_pattern`` aside: output JSON is always compact here)."""
        if not isinstance(options, dict):
            raise InvalidRequestError(f"{param} must be an object", param=param, code="invalid_type")
        given = [k for k in KINDS if options.get(k) not in (None, False)]
        unknown = set(options) - set(KINDS) - {"disable_any_whitespace", "whitespace_pattern"}
        if unknown or len(given) != 1:
            raise InvalidRequestError(f"{param} must set exactly one of {', '.join(KINDS)}"
                                      + (f" (unknown: {sorted(unknown)[:3]})" if unknown else ""), param=param,
                                      code="invalid_value")
        kind, value = given[0], options[given[0]]
        if kind == "json":
            return cls.json_schema(value, param)
        if kind == "json_object":
            return cls("json_object", param=param)
        if kind == "choice":
            return cls("choice", choices=value if isinstance(value, list) else (), param=param)
        return cls(kind, value if isinstance(value, str) else 0, param=param)  # type: ignore[arg-type]
