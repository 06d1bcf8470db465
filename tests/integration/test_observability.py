"""Observability on the live cluster: /metrics aggregated over every replica (vLLM's names from both engines,
modelfleet's own), OpenMetrics by negotiation, a real Prometheus evaluating every dashboard panel, the
request log with privacy off leaving no prompt text in any log file of the Ray session."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.dashboard import build_dashboard, metric_families, panel_queries, resolve_expr
from tests.prometheus_server import PrometheusServer, ensure_prometheus

# Families that need hardware or an event this session cannot make: their absence is by design.
NEEDS_GPU = {"modelfleet_gpu_utilization_ratio", "modelfleet_gpu_memory_used_bytes"}


def scrape(base: str, accept: str = "") -> dict[str, list]:
    r = httpx.get(f"{base}/metrics", headers={"accept": accept} if accept else {}, timeout=30)
    assert r.status_code == 200, r.text
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(families: dict, sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    return sum(s.value for s in families.get(family, []) if s.name == sample
               and all(s.labels.get(k) == v for k, v in labels.items()))


def load(server: str, router_url: str, n: int = 4) -> None:
    """Streams and unary requests on both engines and both paths, an embedding, one invalid request."""
    for base in (server, router_url):
        for model in ("native", "vllm", "native-spec"):
            for i in range(n):
                body = {"model": model, "prompt": f"def f{i}():", "max_tokens": 8, "temperature": 0,
                        "stream": i % 2 == 0}
                with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                    assert r.status_code == 200
                    r.read()
    assert httpx.post(f"{router_url}/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]},
                      timeout=60).status_code == 200
    assert httpx.post(f"{server}/v1/completions", json={"model": "native", "prompt": "x", "max_tokens": -1},
                      timeout=60).status_code == 400


def wait_metrics(base: str, check, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        families = scrape(base)
        if check(families) or time.monotonic() > deadline:
            return families
        time.sleep(0.5)


def test_metrics_aggregate_every_replica_with_vllm_names(server, router_url):
    before = scrape(router_url)
    gen_before = {m: value(before, "vllm:generation_tokens_total", model_name=m) for m in ("native", "vllm")}
    load(server, router_url)
    # 8 requests x 8 tokens per model and path pair: at least 64 new tokens per engine once pushed
    families = wait_metrics(router_url, lambda f: all(
        value(f, "vllm:generation_tokens_total", model_name=m) - gen_before[m] >= 64 for m in ("native", "vllm"))
        and value(f, "modelfleet_request_rejections_total", reason="invalid_value") >= 1)
    for model in ("native", "vllm"):
        assert value(families, "vllm:generation_tokens_total", model_name=model) - gen_before[model] >= 64
        assert value(families, "vllm:time_to_first_token_seconds_count", model_name=model) >= 8
        assert value(families, "vllm:e2e_request_latency_seconds_count", model_name=model) >= 8
        assert value(families, "vllm:request_success_total", model_name=model, finished_reason="length") >= 8
        running = [s for s in families["vllm:num_requests_running"] if s.labels["model_name"] == model]
        assert running and all("replica" in s.labels and s.labels["engine"] == "0" for s in running)
    # the same names, types and bucket boundaries from both engines
    for hist in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"):
        les = {m: sorted({s.labels["le"] for s in families[hist] if s.name.endswith("_bucket")
                          and s.labels["model_name"] == m}) for m in ("native", "vllm")}
        assert les["native"] == les["vllm"] and len(les["native"]) > 5, hist
    assert value(families, "vllm:spec_decode_num_draft_tokens_total", model_name="native-spec") > 0
    assert value(families, "modelfleet_requests_total", model_name="native", status="200", ingress="direct") >= 4
    assert value(families, "modelfleet_requests_total", model_name="native", status="200", ingress="router") >= 4
    assert value(families, "modelfleet_request_rejections_total", model_name="native", reason="invalid_value") >= 1
    assert value(families, "modelfleet_replicas", model_name="victim", state="running") == 2
    assert value(families, "modelfleet_embedding_batch_size_count", model_name="minilm") >= 1
    assert "modelfleet_gpu_utilization_ratio" not in families  # no NVML here: absent, not 0


def test_openmetrics_by_content_negotiation(router_url):
    r = httpx.get(f"{router_url}/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"},
                  timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF") and "vllm:generation_tokens_total" in r.text
    plain = httpx.get(f"{router_url}/metrics", timeout=30)
    assert plain.headers["content-type"].startswith("text/plain") and "# EOF" not in plain.text


def _logs_dir() -> Path:
    import ray

    return Path(ray._private.worker.global_worker.node.get_logs_dir_path())


def test_request_log_has_one_line_per_request_and_no_prompt_text(server, router_url):
    marker = f"zebra-{uuid.uuid4().hex}"
    rids = []
    for base in (server, router_url):
        rid = f"obs-{uuid.uuid4().hex[:12]}"
        r = httpx.post(f"{base}/v1/completions", headers={"x-request-id": rid},
                       json={"model": "native", "prompt": f"# {marker}\ndef f():", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        rids.append(rid)
    folder = _logs_dir() / "modelfleet"
    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline:
        lines = [json.loads(line) for f in folder.glob("requests-*.jsonl*") for line in f.read_text().splitlines()]
        if all(any(x["request_id"] == rid for x in lines) for rid in rids):
            break
        time.sleep(0.5)
    mine = [x for x in lines if x["request_id"] in rids]
    assert len(mine) == 2 and {x["ingress"] for x in mine} == {"direct", "router"}
    for x in mine:
        assert x["model"] == "native" and x["status"] == 200 and x["completion_tokens"] == 4
        assert x["prompt_tokens"] > 0 and x["e2e_s"] >= x["ttft_s"] > 0 and x["queue_s"] is not None
        assert "prompt" not in x and "prompt_sha256" not in x
    leaked = []
    for root, _, files in os.walk(_logs_dir()):
        for name in files:
            try:
                if marker in Path(root, name).read_text(errors="ignore"):
                    leaked.append(name)
            except OSError:
                continue
    assert not leaked, f"prompt text found in {leaked}"


def test_every_dashboard_panel_evaluates_on_a_real_prometheus(server, router_url):
    binary = ensure_prometheus()
    if binary is None:
        pytest.skip("no prometheus binary and it cannot be installed here (not root, or no apt-get)")
    host = router_url.removeprefix("http://")
    with PrometheusServer(binary, [host], metrics_path="/metrics", scrape_interval_s=1) as prom:
        prom.wait_for('up{job!=""} == 1', timeout_s=60)
        for _ in range(3):  # traffic across several scrapes, so rates have two points
            load(server, router_url, n=2)
            time.sleep(1.5)
        prom.wait_for("vllm:generation_tokens_total", timeout_s=30)
        time.sleep(3)
        # Autoscaler series exist once an app with the policy ran (test_autoscaling.py, earlier in a full run).
        has_autoscaled = bool(prom.query("modelfleet_autoscaler_signal"))
        has_decisions = bool(prom.query("modelfleet_autoscaler_decisions_total"))
        empty = []
        for title, expr in panel_queries(build_dashboard()):
            families = metric_families(expr)
            if families & NEEDS_GPU:
                continue
            if not has_decisions and "modelfleet_autoscaler_decisions" in families:
                continue  # no scaling decision in this session (test_autoscaling.py makes them)
            if not has_autoscaled and any(f.startswith("modelfleet_autoscaler_") for f in families):
                continue
            if not prom.query(resolve_expr(expr, model_name=".+", rate_interval="30s")):
                empty.append((title, expr))
        assert not empty, f"panels with no data: {empty}"


def test_a_clients_trace_is_continued_through_ingress_replica_and_engine(server, router_url, otlp):
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    for base in (server, router_url):
        r = httpx.post(f"{base}/v1/completions", headers={"traceparent": f"00-{trace_id}-{parent}-01"},
                       json={"model": "native", "prompt": "def f():", "max_tokens": 4, "stream": base == server},
                       timeout=60)
        assert r.status_code == 200
    deadline = time.monotonic() + 30  # the batch processor exports every few seconds
    mine: list = []
    while time.monotonic() < deadline:
        mine = [s for _, s in otlp.spans() if s.trace_id.hex() == trace_id]
        names = [s.name for s in mine]  # each process exports on its own schedule: wait for all of them
        if names.count("engine.decode") >= 2 and names.count("POST /v1/completions") >= 2:
            break
        time.sleep(1)
    by_id = {s.span_id: s for s in mine}
    ingress = [s for s in mine if s.name == "POST /v1/completions"]
    assert len(ingress) == 2 and all(s.parent_span_id.hex() == parent for s in ingress)  # the client's span
    replica = [s for s in mine if s.name == "replica.generate"]
    assert len(replica) == 2 and {by_id[s.parent_span_id].name for s in replica} == {"POST /v1/completions"}
    for phase in ("engine.queued", "engine.prefill", "engine.decode"):
        spans = [s for s in mine if s.name == phase]
        assert len(spans) == 2 and all(by_id[s.parent_span_id].name == "replica.generate" for s in spans), phase
    attrs = {a.key: a.value for a in ingress[0].attributes}
    assert attrs["gen_ai.usage.output_tokens"].int_value == 4 and attrs["http.response.status_code"].int_value == 200
    assert not any("def f()" in str(s) for s in mine)  # no prompt text in spans


def _live_replicas(model: str) -> set[str]:
    import ray

    details = ray.get(ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve").get_serve_instance_details.remote())
    dep = details["applications"]["modelfleet"]["deployments"][model]
    return {r["replica_id"] for r in dep["replicas"] if r["state"] == "RUNNING"}


def test_a_killed_replica_leaves_metrics_and_its_replacement_is_counted_once(router_url):
    import signal

    from tests.integration.test_faults import victim_pids

    starts = value(scrape(router_url), "modelfleet_replica_starts_total", model_name="victim")
    before = _live_replicas("victim")
    doomed = next(iter(victim_pids()))
    os.kill(doomed, signal.SIGKILL)  # a process of the cluster this test session started
    deadline = time.monotonic() + 180
    live: set[str] = set()
    while time.monotonic() < deadline:  # Serve replaces it: two running again, one of them new
        live = _live_replicas("victim")
        if len(live) == 2 and live != before:
            break
        time.sleep(1)
    assert len(live) == 2 and len(live & before) == 1, (before, live)
    families: dict = {}
    deadline = time.monotonic() + 40  # the hub drops a silent source after 15 s
    while time.monotonic() < deadline:
        families = scrape(router_url)
        shown = {s.labels["replica"] for s in families.get("vllm:num_requests_running", [])
                 if s.labels["model_name"] == "victim"}
        if shown == live:
            break
        time.sleep(1)
    assert shown == live, (shown, live)  # the dead replica's series are gone, no replica counted twice
    assert value(families, "modelfleet_replica_starts_total", model_name="victim") == starts + 1
