"""The OpenAI schemas: every field bounded, implemented or refused by name, null as the default."""

from __future__ import annotations

import pytest

from deployments.ingress.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from deployments.ingress.routes import parse
from deployments.messages import ServeError

BASE = {"model": "m", "prompt": "x"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(model, body) -> tuple[int, str | None]:
    with pytest.raises(ServeError) as caught:
        parse(model, body)
    assert caught.value.info.code, caught.value.info  # every refusal carries OpenAI's machine-readable code
    return caught.value.info.status, caught.value.info.param


@pytest.mark.parametrize(("model", "body", "code"), [
    (CompletionRequest, {**BASE, "seed": 2**64}, "invalid_value"),
    (CompletionRequest, {**BASE, "top_k": 2**63}, "invalid_value"),
    (CompletionRequest, {**BASE, "max_tokens": "many"}, "invalid_type"),
    (CompletionRequest, {"prompt": "x"}, "missing_required_parameter"),
    (CompletionRequest, {**BASE, "some_new_field": 1}, "unknown_parameter"),
    (CompletionRequest, {**BASE, "best_of": 3, "n": 4}, "invalid_value"),
    (CompletionRequest, {**BASE, "logit_bias": {"x": 10}}, "invalid_value"),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "unsupported_content"),
])
def test_refusals_carry_openais_code(model, body, code):
    with pytest.raises(ServeError) as caught:
        parse(model, body)
    assert caught.value.info.code == code


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**64), ("seed", 1180591620717411303424), ("seed", -(2**63) - 1), ("top_k", 2**63), ("top_k", -2),
    ("max_tokens", 0), ("max_tokens", 2**40), ("temperature", 2.5), ("temperature", "nan"), ("top_p", 0),
    ("logprobs", 21), ("min_tokens", -1), ("stop", ["a"] * 17), ("stop", [""]), ("stop_token_ids", [-1]),
    ("stop_token_ids", [2**40]), ("n", 0), ("n", 129), ("best_of", 0), ("prompt", []), ("prompt", ""),
    ("prompt", [[1]] * 257), ("prompt", ["a", ""]), ("bad_words", [""]), ("bad_words", ["a"] * 65),
    ("prompt", [-1]), ("user", "u" * 300), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0), ("repetition_penalty", 101), ("min_p", 1.5), ("logit_bias", {"x": 1}),
    ("logit_bias", {"01": 1}), ("logit_bias", {"1": 101}), ("logit_bias", {"99999999999": 1}),
    ("logit_bias", {str(i): 1 for i in range(1025)}),
])
def test_out_of_range_is_400_naming_the_field(field, value):
    status, param = refused(CompletionRequest, {**BASE, field: value})
    assert status == 400 and param is not None and param.split(".")[0] == field


def test_extreme_valid_values_pass():
    req = parse(CompletionRequest, {**BASE, "seed": 2**63 - 1, "top_k": 2**31 - 1, "stop": ["a"] * 16})
    params = req.sampling_params(req.requested_max_tokens(), req.logprobs)
    assert params.seed == 2**63 - 1 and params.top_k == 2**31 - 1 and params.max_tokens == 16


@pytest.mark.parametrize(("model", "body", "field"), [
    (CompletionRequest, {**BASE, "best_of": 3, "stream": True}, "best_of"),
    (CompletionRequest, {**BASE, "n": 64, "prompt": ["a"] * 9}, "n"),
    (CompletionRequest, {**BASE, "suffix": "}"}, "suffix"),
    (CompletionRequest, {**BASE, "some_new_field": 1}, "some_new_field"),
    (ChatCompletionRequest, {**CHAT, "response_format": {"type": "xml"}}, "response_format"),
    (ChatCompletionRequest, {**CHAT, "tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools"),
    (ChatCompletionRequest, {**CHAT, "tool_choice": "required"}, "tool_choice"),
    (ChatCompletionRequest, {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "a", "name": "bob"}]}, "messages"),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "tool", "content": "a"}]}, "messages"),
    (ChatCompletionRequest, {**CHAT, "messages": []}, "messages"),
    (EmbeddingRequest, {"model": "e", "input": ["a"] * 2049}, "input"),
    (EmbeddingRequest, {"model": "e", "input": "a", "dimensions": 8}, "dimensions"),
    (EmbeddingRequest, {"model": "e", "input": [""]}, "input"),
])
def test_unimplemented_fields_are_refused_by_name(model, body, field):
    status, param = refused(model, body)
    assert status == 400 and param is not None and param.split(".")[0] == field


def test_neutral_values_and_nulls_are_accepted():
    req = parse(CompletionRequest, {**BASE, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": None,
                                    "best_of": 1, "suffix": None, "temperature": None, "top_p": None, "n": None,
                                    "stream": None, "seed": None, "stop": None, "max_tokens": None})
    params = req.sampling_params(req.requested_max_tokens(), req.logprobs)
    assert (params.temperature, params.top_p, params.max_tokens) == (1.0, 1.0, 16)
    chat = parse(ChatCompletionRequest, {**CHAT, "tools": [], "tool_choice": "none", "response_format":
                                         {"type": "text"}, "store": False, "messages": [
                                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}]})
    assert chat.turns()[0].content == "ab" and chat.requested_max_tokens() is None


def test_penalties_logit_bias_and_min_p_reach_the_engine():
    req = parse(CompletionRequest, {**BASE, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
                                    "logit_bias": {"5": 10, "7": -100}, "min_p": 0.05})
    p = req.sampling_params(16, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -1, 1.2, 0.05)
    assert p.logit_bias == ((5, 10.0), (7, -100.0)) and p.penalized and p.processed


def test_min_tokens_above_max_tokens_names_min_tokens():
    req = parse(CompletionRequest, {**BASE, "max_tokens": 4, "min_tokens": 8})
    with pytest.raises(ServeError) as caught:
        req.sampling_params(4, None)
    assert caught.value.info.param == "min_tokens"
