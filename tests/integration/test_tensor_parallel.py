"""A tensor-parallel (2 ranks, gloo) model served over HTTP; a killed rank is replaced without a person."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
from ray import serve

from tests.integration.conftest import APP

CODE = "def fibonacci(n):"


def _greedy(client: httpx.Client, model: str) -> list[str]:
    r = client.post("/v1/completions", json={"model": model, "prompt": CODE, "max_tokens": 32, "temperature": 0,
                                             "logprobs": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_tp2_serves_and_matches_tp1(client):
    assert _greedy(client, "tp2") == _greedy(client, "native")


def test_killed_rank_fails_in_flight_requests_clearly_and_recovers(server):
    handle = serve.get_deployment_handle("tp2", app_name=APP)
    pids = handle.worker_pids.remote().result()
    assert len(pids) == 2
    events = []
    with httpx.Client(base_url=server, timeout=60) as c, c.stream(
            "POST", "/v1/completions", json={"model": "tp2", "prompt": CODE, "max_tokens": 1000, "ignore_eos": True,
                                             "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line.removeprefix("data: "))
            if len(events) == 3:
                os.kill(pids[1], signal.SIGKILL)  # a worker process of the cluster this test session started
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert errors and errors[0]["code"] == "replica_failed", events[-3:]
    # Serve's health check sees the dead rank and replaces the whole replica; no one intervenes.
    deadline = time.monotonic() + 180
    with httpx.Client(base_url=server, timeout=30) as c:
        while time.monotonic() < deadline:
            r = c.post("/v1/completions", json={"model": "tp2", "prompt": CODE, "max_tokens": 4})
            if r.status_code == 200:
                break
            time.sleep(2)
        else:
            raise AssertionError(f"tp2 did not recover: {r.status_code} {r.text}")
    new = handle.worker_pids.remote().result()
    assert len(new) == 2 and not set(new) & set(pids)
    with httpx.Client(base_url=server, timeout=60) as c:
        assert c.post("/v1/completions", json={"model": "native", "prompt": CODE, "max_tokens": 4}).status_code == 200
