"""The canary-analysis policy on synthetic metrics: hold, step, promote, roll back."""

from __future__ import annotations

import doctest

from deployments.ingress import rollout
from deployments.ingress.rollout import AnalysisPolicy, RolloutState, VersionStats, decide, error_z

P = AnalysisPolicy(min_requests=100, max_wait_s=300, steps=(10.0, 25.0, 50.0, 100.0))
GOOD = VersionStats(2000, 10, 0.200, None)


def run(canary: VersionStats, weight: float = 10.0, since: float = 0.0, now: float = 60.0):
    return decide(P, RolloutState(weight, since), GOOD, canary, now)


def test_holds_until_enough_requests_or_time():
    assert run(VersionStats(50, 0, 0.2))[0].action == "hold"
    assert run(VersionStats(0, 0, None), now=10_000)[0].action == "hold"  # time alone, without a request: hold
    assert run(VersionStats(50, 0, 0.2), now=400)[0].action == "step"  # time passed with some requests


def test_a_healthy_canary_steps_through_every_weight_then_is_promoted():
    state, seen = RolloutState(10.0, 0.0), []
    for t in range(1, 10):
        d, state = decide(P, state, GOOD, VersionStats(150, 1, 0.21), now=60.0 * t)
        seen.append((d.action, d.weight))
        if state.done:
            break
    assert seen == [("step", 25.0), ("step", 50.0), ("promote", 100.0)]
    assert decide(P, state, GOOD, VersionStats(500, 0, 0.2), now=999)[0].action == "hold"  # ended


def test_more_errors_roll_back_only_when_significant():
    d, s = run(VersionStats(150, 15, 0.2))  # 10% vs 0.5%
    assert d.action == "rollback" and d.weight == 0.0 and s.done and "error rate" in d.reason
    assert run(VersionStats(100, 2, 0.2))[0].action == "step"  # 2% vs 0.5%: z ~ 1.9, not enough evidence
    assert error_z(GOOD, VersionStats(100, 2, 0.2)) < P.error_z < error_z(GOOD, VersionStats(150, 15, 0.2))


def test_slower_ttft_or_divergent_shadow_outputs_roll_back():
    slow = run(VersionStats(150, 0, 0.300))
    assert slow[0].action == "rollback" and "TTFT p95" in slow[0].reason
    assert run(VersionStats(150, 0, 0.240))[0].action == "step"  # 1.2x: within 1.25x
    diverged = run(VersionStats(150, 0, 0.2, exact_match=0.80))
    assert diverged[0].action == "rollback" and "exact match" in diverged[0].reason
    assert run(VersionStats(150, 0, 0.2, exact_match=0.99))[0].action == "step"


def test_the_module_example_runs():
    assert doctest.testmod(rollout).failed == 0
