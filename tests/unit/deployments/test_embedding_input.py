"""/v1/embeddings ``input``: OpenAI's four forms (a text, texts, a token-id list, token-id lists) parse to one
list of inputs; anything else is a 400 naming ``input``."""

from __future__ import annotations

import pytest

from deployments.ingress.protocol import EmbeddingRequest
from deployments.ingress.routes import parse
from deployments.messages import ServeError


@pytest.mark.parametrize(("value", "inputs"), [
    ("a b", ["a b"]),
    (["a", "b"], ["a", "b"]),
    (["1", "2"], ["1", "2"]),  # strings that look like ids stay texts
    ([101, 7592, 102], [[101, 7592, 102]]),  # one id list is one input
    ([[101, 102], [7], [0]], [[101, 102], [7], [0]]),
])
def test_the_four_input_forms(value, inputs):
    assert parse(EmbeddingRequest, {"model": "e", "input": value}).inputs() == inputs


@pytest.mark.parametrize("value", [
    [], [[]], [[1], []], "", [""], [True], [1, True], [1.0], ["a", 1], [[1], "a"], [-1], [[2**31]], {"a": 1},
    [[1]] * 2049, ["a"] * 2049,
])
def test_bad_inputs_are_400s_naming_input(value):
    with pytest.raises(ServeError) as caught:
        parse(EmbeddingRequest, {"model": "e", "input": value})
    info = caught.value.info
    assert info.status == 400 and info.param is not None and info.param.split(".")[0] == "input", info
    assert info.code in ("invalid_value", "invalid_type")
