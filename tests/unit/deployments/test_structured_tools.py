"""The request side of structured output and tools (typed fields, one spec, 400s naming the field, vLLM's
schema for tool_choice required) and the response side (tool calls in bodies and in streamed deltas whatever
the chunking, hermes-style parsing for auto)."""

from __future__ import annotations

import doctest
import json
import random

import pytest

from deployments.ingress import structured, tools
from deployments.ingress.protocol import ChatCompletionRequest, CompletionRequest
from deployments.ingress.responses import Shaper
from deployments.ingress.routes import parse
from deployments.ingress.structured import tool_call_schema
from deployments.ingress.tools import CallReader, ToolShaper, parse_hermes
from deployments.messages import Chunk, ServeError
from parallel.structured_spec import StructuredSpec

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "now"}}]


def _chat(**fields) -> ChatCompletionRequest:
    return parse(ChatCompletionRequest, {**CHAT, **fields})


def _spec(model=ChatCompletionRequest, **fields) -> StructuredSpec | None:
    req = parse(model, {**(CHAT if model is ChatCompletionRequest else {"model": "m", "prompt": "x"}), **fields})
    return req.sampling_params(16, None).structured


def test_doctests():
    assert doctest.testmod(structured).failed == 0 and doctest.testmod(tools).failed == 0


def test_every_source_makes_one_spec_naming_its_field():
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert _spec(response_format=rf) == StructuredSpec.json_schema(schema)
    assert _spec(CompletionRequest, response_format=rf).param == "response_format"  # completions too, as vLLM
    assert _spec(response_format={"type": "json_object"}).kind == "json_object"
    assert _spec(response_format={"type": "text"}) is None
    assert _spec(structured_outputs={"regex": "[0-9]+"}) == StructuredSpec("regex", "[0-9]+")
    assert _spec(structured_outputs={"json": json.dumps(schema)}) == StructuredSpec.json_schema(schema)
    assert _spec(structured_outputs={"json_object": True, "disable_any_whitespace": True}).kind == "json_object"
    assert _spec(guided_choice=["a", "b"]).param == "guided_choice"
    assert _spec(CompletionRequest, guided_grammar='root ::= "x"').kind == "grammar"
    assert json.loads(_spec(CompletionRequest, guided_json=schema).value) == schema


def refused(model=ChatCompletionRequest, **fields) -> tuple[str | None, str]:
    base = CHAT if model is ChatCompletionRequest else {"model": "m", "prompt": "x"}
    with pytest.raises(ServeError) as err:
        parse(model, {**base, **fields}).sampling_params(16, None)
    assert err.value.info.status == 400 and err.value.info.code
    return err.value.info.param, err.value.info.message


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a" * 20_000}, "guided_regex"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ({"guided_json": {"enum": ["x" * 1000] * 80}}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": json.loads(
        '{"items":' * 70 + "{}" + "}" * 70)}}}, "response_format.json_schema.schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$defs": {"a": {"type": "integer"}}}}},
                {"type": "function", "function": {"name": "g", "parameters": {"$defs": {"a": {"type": "string"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "now"}}, "guided_regex": "a"},
     "guided_regex"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0"),
])
def test_bad_fields_are_400s_naming_the_field(fields, param):
    assert refused(**fields)[0] == param


def test_tool_choice_picks_the_constraint_and_the_mode():
    named = _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_mode == "named"
    assert named.sampling_params(16, None).structured == StructuredSpec.json_schema(PARAMS, "tools")
    no_params = _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}})
    assert json.loads(no_params.sampling_params(16, None).structured.value) == {"type": "object", "properties": {}}
    required = _chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert required.tool_mode == "required" and json.loads(required.sampling_params(16, None).structured.value)[
        "maxItems"] == 1
    auto = _chat(tools=TOOLS, guided_regex="<tool_call>.*")  # auto takes a constraint (vLLM does too)
    assert auto.tool_mode == "auto" and auto.sampling_params(16, None).structured.kind == "regex"
    assert _chat(tools=TOOLS, tool_choice="none").tool_mode is None and _chat(tools=[]).tool_mode is None
    assert json.loads(auto.template_tools())[0]["function"]["parameters"] == PARAMS


def test_required_schema_is_vllms():
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    req = _chat(tools=TOOLS, tool_choice="required")
    theirs = get_json_schema_from_tools("required", [ChatCompletionToolsParam.model_validate(t) for t in TOOLS])
    assert tool_call_schema(req.tools, None) == theirs


def test_tool_messages_become_turns_for_the_template():
    req = _chat(tools=TOOLS, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    turns = [t.for_template() for t in req.turns()]
    assert turns[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}
    assert turns[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


# ---- responses -----------------------------------------------------------------------------------------
def test_hermes_parsing():
    assert parse_hermes("no calls") is None
    assert parse_hermes('<tool_call>{"name": "f", "arguments": {"a": [1, "}"]}}</tool_call>\n<tool_call>'
                        '{"name": "g"}</tool_call>') == (None, [("f", '{"a": [1, "}"]}'), ("g", "{}")])
    assert parse_hermes('x<tool_call>{"name": "f", "arguments": {}}') == ("x", [("f", "{}")])  # unclosed, as vLLM
    assert parse_hermes("<tool_call>{not json}</tool_call>") is None
    assert parse_hermes('<tool_call>["f"]</tool_call>') is None


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_the_call_reader_gives_the_same_calls_whatever_the_chunking():
    text = '[{"name":"f","parameters":{"s":"a}\\"]{","n":[1,{"x":2}]}},{"name":"g\\"h","parameters":{}}]'
    rng = random.Random(0)
    for _ in range(200):
        calls: list[list[str]] = []
        reader = CallReader("required")
        for piece in _pieces(text, rng):
            for kind, value in reader.feed(piece):
                calls.append([value, ""]) if kind == "call" else calls[-1].__setitem__(1, calls[-1][1] + value)
        assert calls == [["f", '{"s":"a}\\"]{","n":[1,{"x":2}]}'], ['g"h', "{}"]]


def _stream(shaper, pieces: list[str], reason: str = "stop") -> list[dict]:
    events = []
    for k, p in enumerate(pieces):
        last = k == len(pieces) - 1
        events += list(shaper.events(Chunk(p, (k,), reason if last else None, 3, k + 1)))
    return events


def _calls_of(events: list[dict]) -> tuple[list[dict], str, str]:
    calls: list[dict] = []
    content, reason = "", None
    for e in events:
        for c in e["choices"]:
            d = c["delta"]
            content += d.get("content") or ""
            reason = c["finish_reason"] or reason
            for tc in d.get("tool_calls", ()):
                if "id" in tc:
                    assert tc["type"] == "function" and tc["function"]["arguments"] == "" and tc["index"] == len(calls)
                    calls.append({"id": tc["id"], "name": tc["function"]["name"], "arguments": ""})
                else:
                    calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return calls, content, reason


@pytest.mark.parametrize("mode, text, expect, reason", [
    ("named", '{"city":"Paris","days":3}', [("get_weather", '{"city":"Paris","days":3}')], "stop"),
    ("required", '[{"name":"get_weather","parameters":{"city":"Rome","days":1}},{"name":"now","parameters":{}}]',
     [("get_weather", '{"city":"Rome","days":1}'), ("now", "{}")], "tool_calls"),
    ("auto", 'Sure. <tool_call>{"name": "now", "arguments": {}}</tool_call>', [("now", "{}")], "tool_calls"),
    ("auto", "Just text, a < b <tool", [], "stop"),
])
def test_bodies_and_streams_carry_the_same_tool_calls(mode, text, expect, reason):
    named = "get_weather" if mode == "named" else None
    body = ToolShaper(Shaper("chat", "m"), mode, named).whole([Chunk(text, (1,), "stop", 3, 9)])
    choice = body["choices"][0]
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls", [])]
    assert got == expect and choice["finish_reason"] == reason and body["usage"]["completion_tokens"] == 9
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function"
               for c in choice["message"].get("tool_calls", []))
    rng = random.Random(1)
    for _ in range(30):
        events = _stream(ToolShaper(Shaper("chat", "m"), mode, named), _pieces(text, rng))
        calls, content, finish = _calls_of(events)
        assert [(c["name"], c["arguments"]) for c in calls] == expect and finish == reason
        assert content == (choice["message"]["content"] or "")
        assert events[0]["choices"][0]["delta"]["role"] == "assistant" and "usage" in events[-1]


def test_a_cut_off_call_streams_what_there_is_and_keeps_length():
    events = _stream(ToolShaper(Shaper("chat", "m"), "required"), ['[{"name":"now","param', 'eters":{"a'], "length")
    calls, _, reason = _calls_of(events)
    assert calls[0]["name"] == "now" and calls[0]["arguments"] == '{"a' and reason == "length"
