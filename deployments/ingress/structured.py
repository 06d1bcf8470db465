"""The request side of structured output and tools: typed, bounded fields for ``response_format``, vLLM's
``structured_outputs`` and older ``guided_*`` extras, ``tools`` / ``tool_choice``, and the one
``StructuredSpec`` (``parallel/structured_spec.py``) they make for the engine.

- At most one source constrains the output: ``response_format`` (json_object / json_schema),
  ``structured_outputs`` (json, json_object, regex, choice, grammar) or one ``guided_*`` field; a required or
  named ``tool_choice`` constrains it too and so takes none of them (400 naming the field otherwise).
- A named function constrains the output to its parameters' JSON schema; ``required`` to a JSON array of
  ``{"name": <a tool's name>, "parameters": <its schema>}`` (vLLM's ``get_json_schema_from_tools``);
  ``auto`` leaves the output free and the response parses hermes-style ``<tool_call>`` blocks
  (``deployments/ingress/tools.py``).
- A bad value is a 400 naming the field: an unknown response_format type, a tool_choice naming a function
  not in tools, a schema too large or nested too deep (the engine then refuses what it cannot compile).

Example:
    >>> f = StructuredFields.model_validate({"guided_regex": "[a-z]+"})
    >>> f.structured_spec()
    StructuredSpec(kind='regex', value='[a-z]+', choices=(), param='guided_regex')
    >>> ToolFields.model_validate({"tools": [{"type": "function", "function": {"name": "f"}}],
    ...                            "tool_choice": {"type": "function", "function": {"name": "g"}}})
    Traceback (most recent call last):
    deployments.messages.ServeError: tool_choice names function 'g', which is not in tools
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.messages import ToolCall, invalid
from parallel.errors import InvalidRequestError
from parallel.structured_spec import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_GRAMMAR_BYTES, MAX_REGEX_CHARS, StructuredSpec

MAX_TOOLS = 128  # OpenAI's limit
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]  # OpenAI's, and "." ":"
Choice = Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]
Regex = Annotated[str, Field(max_length=MAX_REGEX_CHARS)]
Grammar = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_BYTES)]
Schema = dict[str, Any] | bool  # bounded when it becomes a spec (size, nesting)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonSchemaFormat(_Strict):
    name: Name
    description: str | None = Field(None, max_length=4096)
    json_schema: Schema = Field(alias="schema")
    strict: bool | None = None  # the output always follows the schema here (constrained decoding)


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: text, json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise invalid("response_format.json_schema is required with type json_schema and only then",
                          param="response_format.json_schema", code="invalid_value")
        return self


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one of json, json_object, regex, choice, grammar."""

    json_: Schema | str | None = Field(None, alias="json")
    json_object: Literal[True] | None = None
    regex: Regex | None = None
    choice: list[Choice] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: Grammar | None = None
    disable_any_whitespace: bool | None = None  # JSON is always compact here


class FunctionDef(_Strict):
    name: Name
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionRef(_Strict):
    name: Name


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionRef


class ToolCallFunction(_Strict):
    name: Name
    arguments: str = Field(max_length=1 << 20)  # JSON text, as the model produced it


class ToolCallParam(_Strict):
    """A tool call in an assistant message of the conversation."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: ToolCallFunction

    def turn(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


def _spec(make: Any, param: str) -> StructuredSpec:
    try:
        return make()
    except InvalidRequestError as err:  # a bound of the spec (size, nesting): the client's 400
        raise invalid(err.message, param=param, code=err.code or "invalid_value") from None


class StructuredFields(_Strict):
    """The fields that constrain the output, shared by completions and chat."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Schema | str | None = None
    guided_regex: Regex | None = None
    guided_choice: list[Choice] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    guided_grammar: Grammar | None = None

    @model_validator(mode="after")
    def _one_source(self) -> StructuredFields:
        rf = self.response_format
        given = ["response_format"] if rf is not None and rf.type != "text" else []
        given += [n for n in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                  if getattr(self, n) is not None]
        if len(given) > 1:
            raise invalid(f"{given[1]} cannot be combined with {given[0]}: one constraint per request",
                          param=given[1], code="invalid_value")
        so = self.structured_outputs
        if so is not None:
            kinds = [k for k in ("json_", "json_object", "regex", "choice", "grammar") if getattr(so, k) is not None]
            if len(kinds) != 1:
                raise invalid("structured_outputs must set exactly one of json, json_object, regex, choice, grammar",
                              param="structured_outputs", code="invalid_value")
        return self

    def structured_spec(self) -> StructuredSpec | None:
        """The output constraint asked for, or None (a bound it exceeds is a 400 naming its field)."""
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type == "json_object":
            return StructuredSpec("json_object", param="response_format")
        if rf is not None and rf.json_schema is not None:
            return _spec(lambda: StructuredSpec.json_schema(rf.json_schema.json_schema, "response_format"),
                         "response_format.json_schema.schema")
        if so is not None:
            options = {"json" if k == "json_" else k: v for k, v in so if k != "disable_any_whitespace"}
            return _spec(lambda: StructuredSpec.from_options({k: v for k, v in options.items() if v is not None}),
                         "structured_outputs")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            value = getattr(self, name)
            if value is not None:
                kind = name.removeprefix("guided_")
                return _spec(lambda k=kind, v=value, n=name: StructuredSpec.from_options({k: v}, n), name)
        return None


def tool_call_schema(tools: list[Tool], parallel: bool | None) -> dict[str, Any]:
    """vLLM's schema for ``tool_choice: required``: an array of calls, each one tool's name and parameters,
    the tools' ``$defs`` merged at the top (one definition per name)."""
    defs: dict[str, Any] = {}
    branches = []
    for t in tools:
        params = dict(t.function.parameters or {"type": "object", "properties": {}})
        for name, d in (params.pop("$defs", None) or {}).items():
            if defs.setdefault(name, d) != d:
                raise invalid(f"tools define $defs {name!r} twice, differently", param="tools", code="invalid_value")
        branches.append({"properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": branches}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema | ({"$defs": defs} if defs else {})


class ToolFields(_Strict):
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request."""

    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)  # [] is no tools (vLLM refuses it; clients send it)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tools(self) -> ToolFields:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise invalid("tools name a function twice", param="tools", code="invalid_value")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise invalid("tool_choice required or a named function needs tools", param="tool_choice",
                          code="invalid_value")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise invalid(f"tool_choice names function {choice.function.name!r}, which is not in tools",
                          param="tool_choice", code="invalid_value")
        return self

    @property
    def tool_mode(self) -> str | None:
        """"named", "required" or "auto" (tools given, the model decides); None: no tool calls."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return "required" if self.tool_choice == "required" else "auto"

    def tool_spec(self, other: StructuredSpec | None) -> StructuredSpec | None:
        """The constraint of a named or required tool_choice (``other``: what the request asked for besides,
        which it may not), else ``other``."""
        mode = self.tool_mode
        if mode not in ("named", "required"):
            return other
        if other is not None:
            raise invalid(f"{other.param} cannot be combined with tool_choice {mode}", param=other.param,
                          code="invalid_value")
        assert self.tools is not None
        if isinstance(self.tool_choice, NamedToolChoice):
            tool = next(t for t in self.tools if t.function.name == self.tool_choice.function.name)
            schema = tool.function.parameters or {"type": "object", "properties": {}}
        else:
            schema = tool_call_schema(self.tools, self.parallel_tool_calls)
        return _spec(lambda: StructuredSpec.json_schema(schema, "tools"), "tools")

    def template_tools(self) -> str | None:
        """The tools as the chat template receives them (``tools=``), as JSON text (frozen, small to send)."""
        if not self.tools:
            return None
        return json.dumps([t.model_dump(exclude_none=True) for t in self.tools], ensure_ascii=False)
