"""The metrics hub's merge and render, the request log's privacy modes, the request observer (no Ray)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from deployments.drift import DriftRecorder
from deployments.ingress.observe import RequestObserver
from deployments.messages import Chunk, ErrorInfo
from deployments.metrics import REJECTIONS, REQUESTS
from deployments.metrics_hub import Family, HubState, Snapshot, render, snapshot_registry
from deployments.request_log import RequestLog, RequestLogConfig


def _registry(tokens: float) -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("vllm:generation_tokens", "Number of generation tokens processed.", ["model_name", "engine"],
            registry=reg).labels("m", "0").inc(tokens)
    Histogram("vllm:time_to_first_token_seconds", "ttft", ["model_name"], buckets=(0.1, 1.0),
              registry=reg).labels("m").observe(0.5)
    Counter("other_thing", "not ours", registry=reg).inc()
    return reg


def _parse(body: bytes) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def test_snapshots_of_two_replicas_merge_under_one_family_each():
    snaps = [Snapshot(f"r{i}", (("replica", f"r{i}"),), snapshot_registry(_registry(10.0 * (i + 1))), "m")
             for i in range(2)]
    assert all(not f.name.startswith("other") for s in snaps for f in s.families)  # only vllm: / modelfleet_
    assert all(not name.endswith("_created") for s in snaps for f in s.families for name, _, _ in f.samples)
    body, ctype = render(snaps)
    assert ctype.startswith("text/plain")
    fams = _parse(body)
    tokens = {s.labels["replica"]: s.value for s in fams["vllm:generation_tokens"]}
    assert tokens == {"r0": 10.0, "r1": 20.0}
    assert body.decode().count("# TYPE vllm:generation_tokens_total counter") == 1
    buckets = [s for s in fams["vllm:time_to_first_token_seconds"] if s.name.endswith("_bucket")]
    assert {(s.labels["replica"], s.labels["le"], s.value) for s in buckets} >= {("r0", "1.0", 1.0),
                                                                               ("r1", "+Inf", 1.0)}


def test_openmetrics_keeps_vllms_colon_names():
    snap = Snapshot("r0", (("replica", "r0"),), snapshot_registry(_registry(3.0)))
    body, ctype = render([snap], accept="application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert ctype.startswith("application/openmetrics-text")
    text = body.decode()
    assert 'vllm:generation_tokens_total{engine="0",model_name="m",replica="r0"} 3.0' in text
    assert "vllm_generation" not in text and text.endswith("# EOF\n")


def test_a_family_with_a_conflicting_type_is_left_out_for_that_source():
    a = Snapshot("a", (("replica", "a"),), (Family("modelfleet_x", "gauge", "x", (("modelfleet_x", (), 1.0),)),))
    b = Snapshot("b", (("replica", "b"),), (Family("modelfleet_x", "counter", "x",
                                                     (("modelfleet_x_total", (), 5.0),)),))
    samples = _parse(render([a, b])[0])["modelfleet_x"]
    assert [(s.labels["replica"], s.value) for s in samples] == [("a", 1.0)]


def test_a_silent_replica_is_dropped_and_its_replacement_counted_once():
    state = HubState()
    fam = (Family("vllm:g", "gauge", "g", (("vllm:g", (), 1.0),)),)
    state.push(Snapshot("old", (("replica", "old"),), fam, "m", ttl_s=15.0), now=0.0)
    state.push(Snapshot("old", (("replica", "old"),), fam, "m", ttl_s=15.0), now=10.0)  # the same replica again
    state.push(Snapshot("new", (("replica", "new"),), fam, "m", ttl_s=15.0), now=20.0)
    assert state.starts == {"m": 2}
    assert [s.source for s in state.live(now=26.0)] == ["new"]  # old: silent for 16 s > ttl
    assert [s.source for s in state.live(now=36.0)] == []
    state.push(Snapshot("new", (("replica", "new"),), fam, "m", ttl_s=15.0), now=40.0)  # back after a silence
    assert state.starts == {"m": 2}  # not a new start


def test_a_slow_pusher_gets_a_longer_ttl():
    from deployments.metrics_hub import MetricsPusher

    assert MetricsPusher("s", {}, interval_s=2.0).ttl_s == 15.0
    assert MetricsPusher("s", {}, interval_s=30.0).ttl_s == 90.0  # never expires between its own pushes


def test_autoscaling_decisions_become_the_hubs_own_series():
    state = HubState()
    state.autoscaling("m", 3, {"queue_depth": 6.5, "kv_usage": 0.2}, "up", "queue_depth", now=0.0)
    state.autoscaling("m", 3, {"queue_depth": 1.0}, None, "queue_depth", now=1.0)
    fams = _parse(render([], state.own())[0])
    assert [s.value for s in fams["modelfleet_autoscaler_desired_replicas"]] == [3.0]
    assert {s.labels["signal"]: s.value for s in fams["modelfleet_autoscaler_signal"]} == {"queue_depth": 1.0,
                                                                                          "kv_usage": 0.2}
    decisions = fams["modelfleet_autoscaler_decisions"]
    assert [(s.labels["direction"], s.labels["driver"], s.value) for s in decisions] == [("up", "queue_depth", 1.0)]
    state.expire(now=100.0)  # the policy stopped reporting (the deployment is gone): its gauges go
    assert not state.desired and not state.signals and state.decisions


def test_the_autoscaling_policy_names_the_same_hub():
    from cluster.autoscaling import HUB
    from deployments.metrics_hub import HUB_NAME, HUB_NAMESPACE

    assert HUB == (HUB_NAME, HUB_NAMESPACE)


@pytest.mark.parametrize("privacy", ["off", "hashed", "full"])
def test_request_log_privacy_modes(tmp_path, privacy):
    log = RequestLog(RequestLogConfig(dir=str(tmp_path), privacy=privacy), "router-1")
    obs = RequestObserver("router", log)
    out = obs.begin("r1", "/v1/completions")
    out.model = "m"
    obs.with_body(out, {"model": "m", "prompt": "secret prompt"})
    out.chunk(Chunk("secret ", (1,), None, 4, 1, queue_s=0.25), now=out.started + 0.1)
    out.chunk(Chunk("answer", (2,), "stop", 4, 2))
    obs.end(out, 200)
    log.close()
    text = (tmp_path / "requests-router-1.jsonl").read_text()
    line = json.loads(text)
    assert line["request_id"] == "r1" and line["model"] == "m" and line["status"] == 200
    assert (line["prompt_tokens"], line["completion_tokens"], line["finish_reason"]) == (4, 2, "stop")
    assert line["queue_s"] == 0.25 and line["ttft_s"] == pytest.approx(0.1, abs=1e-3)
    if privacy == "off":
        assert "secret" not in text and "answer" not in text
    elif privacy == "hashed":
        import hashlib

        assert line["prompt_sha256"] == hashlib.sha256(b"secret prompt").hexdigest()
        assert line["completion_sha256"] == hashlib.sha256(b"secret answer").hexdigest()
        assert "secret" not in text
    else:
        assert (line["prompt"], line["completion"]) == ("secret prompt", "secret answer")


def test_request_log_rotates_at_its_size_bound(tmp_path):
    log = RequestLog(RequestLogConfig(dir=str(tmp_path), max_bytes=4096, backups=2), "p")
    for i in range(200):
        log.write({"request_id": f"r{i}", "pad": "x" * 100})
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["requests-p.jsonl", "requests-p.jsonl.1", "requests-p.jsonl.2"]
    assert all(p.stat().st_size <= 4096 + 200 for p in tmp_path.iterdir())


def _count(counter, **labels) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples
               if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()))


def test_an_outcome_is_recorded_once_with_the_error_code_as_reason():
    obs = RequestObserver("direct", drift=DriftRecorder())
    before = _count(REJECTIONS, model_name="unit-m", reason="overloaded")
    requests_before = _count(REQUESTS, model_name="unit-m", status="503", ingress="direct")
    out = obs.begin("r2", "/v1/completions")
    out.model = "unit-m"
    out.fail(ErrorInfo(503, "full", code="overloaded"))
    obs.end(out, 503)
    obs.end(out, 503)
    assert _count(REJECTIONS, model_name="unit-m", reason="overloaded") == before + 1
    assert _count(REQUESTS, model_name="unit-m", status="503", ingress="direct") == requests_before + 1
    assert obs.drift.take().requests == 0  # refused requests are no sample of the traffic's shape


def test_a_finished_request_feeds_drift():
    obs = RequestObserver("router", drift=DriftRecorder())
    out = obs.begin("r3", "/v1/completions")
    out.model = "unit-d"
    out.chunk(Chunk("ab", (1, 2), "length", 7, 2))
    obs.end(out, 200)
    assert obs.drift.take().requests == 1


def test_stats_line_is_quiet_when_idle_and_counts_across_an_engine_restart():
    from deployments.stats_line import stats_line
    from parallel.engine_stats import EngineStats

    idle = EngineStats(0, 0, 0, 64, 0.0, 0.0, 0.0, 0, generated_tokens=500)
    assert stats_line("m", idle, idle, 10.0) is None
    restarted = EngineStats(0, 2, 8, 64, 0.125, 0.0, 0.0, 0, generated_tokens=30, spec_num_drafts=10,
                            spec_num_draft_tokens=30, spec_num_accepted_tokens=15)
    line = stats_line("m", idle, restarted, 10.0)
    assert "Avg generation throughput: 3.0 tokens/s" in line and "Running: 2 reqs" in line
    assert "Mean acceptance length: 2.50" in line and "Avg draft acceptance rate: 50.0%" in line
