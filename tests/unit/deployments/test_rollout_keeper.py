"""The cluster-wide canary analysis (without Ray): counts from several routers, one decision per interval,
steps that restart the counts, promotion, rollback, a new spec starting afresh."""

from __future__ import annotations

import doctest

from deployments.ingress import rollout_keeper
from deployments.ingress.rollout_keeper import Analysis, Keeper, KeeperClient, VersionCounts, p95
from deployments.ingress.versions import AnalysisSpec

SPEC = {"canary": "b", "min_requests": 20, "interval_s": 5, "steps": [10, 50, 100]}
VERSIONS = {"a": 90.0, "b": 10.0}


def counts(n: int, errors: int = 0, ttft: float = 0.1) -> VersionCounts:
    return VersionCounts(n, errors, [ttft] * n)


def test_doctests():
    assert doctest.testmod(rollout_keeper).failed == 0


def test_p95_is_the_nearest_rank():
    assert p95([]) is None
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([3.0]) == 3.0


def test_two_routers_counts_add_up_and_one_decision_per_interval():
    k = Keeper()
    w, d = k.sync("m", SPEC, VERSIONS, {"a": counts(50), "b": counts(10)}, now=0.0)
    assert w == {"a": 90.0, "b": 10.0} and d is None  # the first interval has not passed
    w, d = k.sync("m", SPEC, VERSIONS, {"a": counts(50), "b": counts(10)}, now=5.0)  # router 2: 20 in all
    assert d.action == "step" and w == {"a": 50.0, "b": 50.0}
    w, d = k.sync("m", SPEC, VERSIONS, {"a": counts(50), "b": counts(50)}, now=6.0)
    assert d is None  # within the interval: no second decision, whoever asks
    w, d = k.sync("m", SPEC, VERSIONS, {}, now=11.0)
    assert d.action == "promote" and w == {"a": 0.0, "b": 100.0}
    assert k.sync("m", SPEC, VERSIONS, {"b": counts(100, errors=100)}, now=20.0)[0] == {"a": 0.0, "b": 100.0}


def test_a_step_restarts_the_counts():
    a = Analysis(AnalysisSpec.model_validate(SPEC), VERSIONS, now=0.0)
    a.add({"a": counts(100), "b": counts(30)})
    assert a.maybe_decide(now=5.0).action == "step"
    assert a.counts["b"].requests == 0
    a.add({"a": counts(100), "b": counts(5)})
    assert a.maybe_decide(now=10.0).action == "hold"  # 5 < min_requests at the new step


def test_errors_roll_back_and_the_rollout_ends():
    k = Keeper()
    k.sync("m", SPEC, VERSIONS, {"a": counts(400, 2), "b": counts(40, 20)}, now=0.0)
    w, d = k.sync("m", SPEC, VERSIONS, {}, now=5.0)
    assert d.action == "rollback" and w == {"a": 100.0, "b": 0.0}
    assert "error rate" in d.reason
    assert k.status()["m"]["done"] is True


def test_slow_canary_rolls_back_on_ttft():
    k = Keeper()
    k.sync("m", SPEC, VERSIONS, {"a": counts(100, ttft=0.1), "b": counts(30, ttft=0.5)}, now=0.0)
    assert k.sync("m", SPEC, VERSIONS, {}, now=5.0)[1].action == "rollback"


def test_a_changed_spec_or_table_starts_afresh():
    k = Keeper()
    k.sync("m", SPEC, VERSIONS, {"a": counts(100), "b": counts(30)}, now=0.0)
    assert k.sync("m", SPEC, VERSIONS, {}, now=5.0)[0] == {"a": 50.0, "b": 50.0}
    w, _ = k.sync("m", {**SPEC, "steps": [25, 100]}, VERSIONS, {}, now=6.0)
    assert w == {"a": 90.0, "b": 10.0}
    w, _ = k.sync("m", SPEC, {"a": 80.0, "b": 20.0}, {}, now=7.0)
    assert w == {"a": 80.0, "b": 20.0}


def test_shadow_exact_match_of_the_canary_counts():
    k = Keeper()
    b = counts(30)
    b.greedy_pairs, b.exact_pairs = 40, 10  # 25% exact: the canary diverges from the primary
    k.sync("m", SPEC, VERSIONS, {"a": counts(100), "b": b}, now=0.0)
    d = k.sync("m", SPEC, VERSIONS, {}, now=5.0)[1]
    assert d.action == "rollback" and "exact match" in d.reason


def test_client_keeps_counts_it_could_not_hand_over(monkeypatch):
    client = KeeperClient(timeout_s=0.1)
    for i in range(10):
        client.record("m", "b", ok=i != 0, ttft_s=0.1)

    def unreachable():
        raise ConnectionError("no ray here")

    monkeypatch.setattr(rollout_keeper, "keeper_actor", unreachable)
    import asyncio

    import pytest

    with pytest.raises(ConnectionError):
        asyncio.run(client.sync("m", AnalysisSpec.model_validate(SPEC), VERSIONS, shadow=("b", 4, 3)))
    kept = client.counts["m"]["b"]
    assert (kept.requests, kept.errors, kept.greedy_pairs, kept.exact_pairs) == (10, 1, 4, 3)
