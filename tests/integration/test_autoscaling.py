"""Autoscaling on queue depth through Serve's custom policy: 1 -> 2 under load, back to 1 when idle, with
no failed requests; a model at zero replicas serves its first request (held at the router meanwhile)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from ray import serve

from tests.integration.conftest import TARGET, wait_healthy

APP, PREFIX = "autoscale", "/autoscale"
FAST = {"upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "target_queue_depth": 2.0}


@pytest.fixture(scope="module")
def autoscale_app(server):
    from cluster.app import build

    opts = {"dtype": "float32", "max_num_seqs": 2, "kv_cache_memory_bytes": 64 << 20}
    serve.run(build({"name": APP, "models": [
        # A queue is what this test scales on: admission lets it grow (the default refuses a 20 s wait).
        {"name": "elastic", "source": TARGET, "engine_options": opts, "resources": {"num_cpus": 0.25},
         "autoscaling": {"min_replicas": 1, "max_replicas": 2, **FAST},
         "admission": {"max_queue_wait_s": 600, "max_waiting": 64}},
        {"name": "cold", "source": TARGET, "engine_options": opts, "resources": {"num_cpus": 0.25},
         "autoscaling": {"min_replicas": 0, "max_replicas": 1, **FAST}},
    ], "router": {"num_cpus": 0.1}}), name=APP, route_prefix=PREFIX)
    base = server + PREFIX
    assert wait_healthy(base, 300)
    yield base
    serve.delete(APP)


def _replicas(model: str) -> int:
    status = serve.status().applications[APP].deployments[model]
    return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))


def _wait_replicas(model: str, n: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _replicas(model) == n:
            return True
        time.sleep(0.5)
    return False


def test_load_scales_up_then_idle_scales_down_without_failures(autoscale_app):
    assert _wait_replicas("elastic", 1, 60)

    def call(i: int) -> int:
        r = httpx.post(f"{autoscale_app}/v1/completions", timeout=300, json={
            "model": "elastic", "prompt": f"def f{i}():", "max_tokens": 200, "ignore_eos": True})
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(call, i) for i in range(24)]  # 24 long requests, 2 slots per replica
        scaled_up = _wait_replicas("elastic", 2, 120)
        codes = [f.result() for f in futures]
    assert scaled_up, "did not scale 1 -> 2 under load"
    assert codes == [200] * 24
    # Idle: back to 1, and requests during the transition still succeed.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        during = list(pool.map(call, range(2)))
    assert _wait_replicas("elastic", 1, 120), "did not scale back to 1 when idle"
    assert during == [200, 200]


def test_scale_from_zero_serves_the_first_request(autoscale_app):
    assert _wait_replicas("cold", 0, 120), "min_replicas 0 model did not scale to zero"
    health = httpx.get(f"{autoscale_app}/health", timeout=30).json()
    assert health["models"]["cold"] == "on-demand"
    r = httpx.post(f"{autoscale_app}/v1/completions", timeout=300,
                   json={"model": "cold", "prompt": "def f():", "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
