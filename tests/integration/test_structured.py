"""Structured output and tools with the official openai client, on both engines, unary and streamed (issue 16):
JSON schemas (20 prompts to the tiny model, every answer parses and validates), regex, choice, grammar and
json_object; tool calls for a named function, ``required`` and hermes-style ``auto``; tool messages in the
conversation; hostile specs are 400s naming their field and the engines go on serving."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import xgrammar as xgr

from tests.integration.conftest import TARGET

ENGINES = ["native", "vllm"]
# A finite language (enums, booleans, bounded integers and strings): a random-ish model has to finish it.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age", "ok", "color", "tags"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "metric": {"type": "boolean"}},
           "required": ["city", "days", "metric"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
PROMPTS = [f"# record {i}\nimport json\nrow = " for i in range(20)]


@pytest.fixture()
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(oai: openai.OpenAI, engine: str, content: str, stream: bool, **kw) -> tuple[str, str, list]:
    """(content, finish_reason, tool calls as [id, name, arguments]) of one chat, accumulated from the stream."""
    if not stream:
        r = oai.chat.completions.create(model=engine, messages=[{"role": "user", "content": content}], **kw)
        m = r.choices[0].message
        return m.content or "", r.choices[0].finish_reason, [[c.id, c.function.name, c.function.arguments]
                                                             for c in m.tool_calls or ()]
    text, reason, calls = "", None, []
    for ev in oai.chat.completions.create(model=engine, messages=[{"role": "user", "content": content}],
                                          stream=True, **kw):
        for c in ev.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
            for tc in c.delta.tool_calls or ():
                if tc.id is not None:  # a call's first delta: id, type, name, arguments ""
                    assert tc.type == "function" and tc.function.arguments == "" and tc.index == len(calls)
                    calls.append([tc.id, tc.function.name, ""])
                else:
                    calls[tc.index][2] += tc.function.arguments
    return text, reason, calls


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
@pytest.mark.parametrize("engine", ENGINES)
def test_twenty_prompts_all_follow_the_json_schema(oai, engine, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}

    def one(i: int) -> tuple[str, str, list]:
        return _chat(oai, engine, PROMPTS[i], stream, response_format=fmt, max_tokens=120, seed=i)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(one, range(20)))
    for text, reason, _ in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({t for t, _, _ in answers}) > 1  # sampled, not one canned answer


@pytest.mark.parametrize("engine", ENGINES)
def test_regex_choice_and_grammar_on_completions(oai, engine):
    regex = r"[a-z]{3,8}@example\.(com|org)"
    for seed in range(3):
        r = oai.completions.create(model=engine, prompt="email = ", max_tokens=30, seed=seed,
                                   extra_body={"guided_regex": regex})
        assert re.fullmatch(regex, r.choices[0].text) and r.choices[0].finish_reason == "stop"
        r = oai.completions.create(model=engine, prompt="answer: ", max_tokens=10, seed=seed,
                                   extra_body={"structured_outputs": {"choice": ["yes", "no", "it depends"]}})
        assert r.choices[0].text in ("yes", "no", "it depends")
    streamed = "".join(e.choices[0].text for e in oai.completions.create(
        model=engine, prompt="x = ", max_tokens=12, seed=1, stream=True,
        extra_body={"guided_grammar": 'root ::= "(" [0-9] [0-9]? " " ("+" | "-") " " [0-9] ")"'}))
    assert re.fullmatch(r"\([0-9]{1,2} [+-] [0-9]\)", streamed)


@pytest.mark.parametrize("engine", ENGINES)
def test_json_object_is_json_when_stopped_and_a_json_prefix_when_cut(oai, engine):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(f"{TARGET}/tokenizer.json")), vocab_size=4096, stop_token_ids=[2])
    any_json = xgr.GrammarCompiler(info).compile_builtin_json_grammar()
    reasons = set()
    for seed in range(6):
        text, reason, _ = _chat(oai, engine, "Give me JSON.", seed % 2 == 1, max_tokens=24, seed=seed,
                                response_format={"type": "json_object"})
        reasons.add(reason)
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length" and text.startswith("{") and xgr.GrammarMatcher(any_json).accept_string(text)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_named_function_gets_arguments_that_validate(oai, engine, stream):
    for seed in range(3):
        text, reason, calls = _chat(oai, engine, "Weather in Rome?", stream, tools=TOOLS, seed=seed, max_tokens=60,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert reason == "stop" and text == "" and len(calls) == 1  # OpenAI's finish reason for a forced call
        call_id, name, arguments = calls[0]
        assert name == "get_weather" and call_id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(arguments), WEATHER)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
@pytest.mark.parametrize("engine", ENGINES)
def test_required_tool_calls_name_a_tool_and_validate(oai, engine, stream):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):  # one call each (parallel_tool_calls false: vLLM's maxItems 1), so that it ends
        _, reason, calls = _chat(oai, engine, "Call a tool.", stream, tools=TOOLS, tool_choice="required",
                                 parallel_tool_calls=False, seed=seed, max_tokens=80)
        assert reason == "tool_calls" and len(calls) == 1
        jsonschema.validate(json.loads(calls[0][2]), schemas[calls[0][1]])
    # any number of calls: the model may go on calling until max_tokens; every complete call validates
    _, reason, calls = _chat(oai, engine, "Call tools.", stream, tools=TOOLS, tool_choice="required", seed=9,
                             max_tokens=150)
    assert reason in ("tool_calls", "length") and calls
    for _, name, arguments in calls[:-1] if reason == "length" else calls:
        jsonschema.validate(json.loads(arguments), schemas[name])


@pytest.mark.parametrize("engine", ENGINES)
def test_auto_parses_hermes_tool_calls_and_tool_messages_render(oai, engine):
    # The tiny model never writes <tool_call> on its own: a regex makes it, and auto parses what it wrote.
    regex = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}</tool_call>'
    for stream in (False, True):
        text, reason, calls = _chat(oai, engine, "Time?", stream, tools=TOOLS, tool_choice="auto", max_tokens=200,
                                    extra_body={"structured_outputs": {"regex": regex}})
        assert reason == "tool_calls" and text == "" and [c[1] for c in calls] == ["get_time"]
        assert json.loads(calls[0][2])["zone"] in ("UTC", "CET")
    text, reason, calls = _chat(oai, engine, "Hi", False, tools=TOOLS, max_tokens=8, seed=3)  # auto by default
    assert not calls and reason in ("stop", "length")
    r = oai.chat.completions.create(model=engine, tools=TOOLS, max_tokens=8, messages=[
        {"role": "user", "content": "Time in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}])
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 10


def _status(server: str, path: str, body: dict) -> tuple[int, dict]:
    r = httpx.post(f"{server}/v1/{path}", json=body, timeout=300)
    return r.status_code, r.json()


@pytest.mark.parametrize("engine", ENGINES)
def test_hostile_specs_are_400s_naming_the_field_and_the_engine_goes_on(server, engine):
    chat = {"model": engine, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}
    deep = json.loads('{"type": "array", "items": ' * 40 + "{}" + "}" * 40)  # beyond the body's depth limit
    cases = [
        ({**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format"),
        ({**chat, "guided_regex": "(unclosed"}, "guided_regex"),
        ({**chat, "guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({**chat, "structured_outputs": {"json": {"type": "integer", "multipleOf": 3}}}, "structured_outputs"),
        ({**chat, "guided_json": {"enum": ["v" * 1000] * 70}}, "guided_json"),  # 70 KB: above the 64 KiB bound
        ({**chat, "response_format": {"type": "xml"}}, "response_format.type"),
        ({**chat, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm_rf"}}}, "tool_choice"),
    ]
    for body, param in cases:
        status, out = _status(server, "chat/completions", body)
        assert status == 400 and out["error"]["param"] == param, (param, out)
    status, out = _status(server, "chat/completions", {**chat, "response_format": {
        "type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}})
    assert status == 400 and out["error"]["type"] == "invalid_request_error"
    # many distinct optional properties: seconds of compiling, off the step loop; others are served meanwhile
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 9} for i in range(800)}}
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(_status, server, "chat/completions", {**chat, "guided_json": wide, "max_tokens": 4})
        status, out = _status(server, "completions", {"model": engine, "prompt": "def f():", "max_tokens": 4})
        assert status == 200 and out["choices"][0]["text"]
        assert slow.result()[0] == 200
    status, out = _status(server, "completions", {"model": engine, "prompt": "n = ", "max_tokens": 5,
                                                   "guided_regex": "[0-9]{5}"})
    assert status == 200 and re.fullmatch("[0-9]{5}", out["choices"][0]["text"])


def test_structured_output_with_speculative_decoding(server):
    body = {"prompt": "x", "max_tokens": 5, "guided_choice": ["yes", "no"]}
    status, out = _status(server, "completions", {**body, "model": "native-spec"})
    assert status == 400 and (out["error"]["code"], out["error"]["param"]) == ("unsupported_parameter", "guided_choice")
    status, out = _status(server, "completions", {**body, "model": "vllm-spec"})  # vLLM's own implementation
    assert status == 200 and out["choices"][0]["text"] in ("yes", "no")
