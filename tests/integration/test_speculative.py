"""Speculative decoding behind Serve: greedy output equals the plain model's, on both engines."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from ray import serve

from tests.integration.conftest import APP

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):\n        self.items = []\n",
           "for i in range(10):"]


def _greedy_batch(server: str, model: str) -> list[list[str]]:
    def one(prompt: str) -> list[str]:
        r = httpx.post(f"{server}/v1/completions", timeout=120, json={
            "model": model, "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["tokens"]

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # one batch of mixed lengths
        return list(pool.map(one, PROMPTS))


@pytest.mark.parametrize("plain, spec", [("native", "native-spec"), ("native", "native-spec-sep"),
                                         ("vllm", "vllm-spec")])
def test_greedy_with_speculation_equals_without(server, plain, spec):
    assert _greedy_batch(server, spec) == _greedy_batch(server, plain)


def test_native_spec_stats_report_acceptance(server):
    _greedy_batch(server, "native-spec")
    stats = serve.get_deployment_handle("native-spec", app_name=APP).stats.remote().result()
    assert 0.0 < stats["spec_acceptance_rate"] <= 1.0
    assert stats["spec_mean_tokens_per_step"] > 1.0


def test_separate_draft_reports_its_call_cost(server):
    _greedy_batch(server, "native-spec-sep")
    stats = serve.get_deployment_handle("native-spec-sep", app_name=APP).stats.remote().result()
    assert stats["draft_calls"] > 0 and stats["draft_call_ms"] > 0
    assert stats["spec_acceptance_rate"] > 0
