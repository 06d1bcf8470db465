"""Model resolution and replica admission: pure policies, without Ray."""

from __future__ import annotations

import pytest

from deployments.admission import AdmissionLimits, Load, LoadTracker, decide, expected_wait
from deployments.ingress.resolve import ModelRoute, Resolver, Target
from deployments.messages import ServeError

ROUTES = [ModelRoute("code", "llm", (Target("code"),)), ModelRoute("minilm", "embedding", (Target("minilm"),))]


def test_resolve_by_name_and_kind():
    r = Resolver(ROUTES)
    assert r.resolve("code", "llm").deployment == "code"
    assert r.resolve("minilm", "embedding").deployment == "minilm"
    assert r.deployments() == {"code", "minilm"}


@pytest.mark.parametrize(("model", "kind"), [("nope", "llm"), ("minilm", "llm"), ("code", "embedding")])
def test_unknown_or_wrong_kind_is_404_naming_model(model, kind):
    with pytest.raises(ServeError) as caught:
        Resolver(ROUTES).resolve(model, kind)
    info = caught.value.info
    assert (info.status, info.param, info.code) == (404, "model", "model_not_found")


def test_expected_wait_is_zero_with_free_slots_and_grows_with_the_queue():
    assert expected_wait(Load(slots=4, running=2, queued=1, mean_service_s=2.0)) == 0.0
    assert expected_wait(Load(4, 4, 0, 2.0)) == pytest.approx(0.5)  # one slot frees every T / slots
    assert expected_wait(Load(4, 4, 8, 2.0)) == pytest.approx(4.5)
    assert expected_wait(Load(4, 4, 8, None)) == 0.0  # nothing measured yet: no estimate


def test_decide_refuses_long_queues_slow_queues_and_hopeless_deadlines():
    limits = AdmissionLimits(max_waiting=10, max_queue_wait_s=3.0)
    assert decide(Load(4, 4, 2, 2.0), limits).admit
    full = decide(Load(4, 4, 10, None), limits)
    assert not full.admit and "max_waiting" in full.reason
    slow = decide(Load(4, 4, 8, 2.0), limits)  # 4.5 s expected
    assert not slow.admit and "max_queue_wait_s" in slow.reason and slow.retry_after_s >= 1
    assert not decide(Load(4, 4, 2, 2.0), limits, time_left_s=0.5).admit  # 1.5 s wait, 0.5 s left


def test_tracker_counts_and_learns_service_time():
    t = LoadTracker(slots=2)
    for _ in range(3):
        t.enqueue()
    t.start()
    t.start()
    assert t.snapshot() == Load(2, 2, 1, None)
    t.finish(started=True, service_s=4.0)
    t.finish(started=False, service_s=None)  # refused after admission (e.g. prompt too long)
    assert t.snapshot() == Load(2, 1, 0, 4.0)
    t.finish(started=True, service_s=2.0)
    assert t.mean_service_s == pytest.approx(0.8 * 4.0 + 0.2 * 2.0)
