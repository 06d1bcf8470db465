"""Automated canary analysis: a pure policy that steps a canary's weight up, promotes it, or rolls it back.

Like ``cluster/autoscaling.py``: ``decide(policy, state, primary, canary, now) -> (Decision, state)``, no Ray,
no clock of its own. The caller (``rollout_keeper.py``, one analysis per model for the whole cluster) feeds each
version's counts *since the current step began* and applies the decision; every decision carries its reason
for the log and a metric.

An analysis runs once the canary has ``min_requests`` requests at its step, or ``max_wait_s`` passed with at
least one. It compares the canary with the primary (the practice of Kayenta / Argo Rollouts analysis: the
canary judged against the baseline it would replace, not against fixed thresholds):

- error rate: roll back when the canary's exceeds the primary's by more than ``max_error_rate_increase``
  *and* a one-sided two-proportion z-test says so at ``z >= error_z`` (so a handful of requests cannot
  roll back on one unlucky error, nor hide a real regression);
- TTFT p95: roll back when the canary's exceeds ``max_ttft_p95_ratio`` times the primary's;
- divergence (with a shadow): roll back when the greedy exact-match rate falls below ``min_exact_match``.

Otherwise the weight moves to the next of ``steps``; past the last one the canary is promoted.

Example:
    >>> p = AnalysisPolicy(min_requests=100, steps=(10.0, 50.0, 100.0))
    >>> s = RolloutState(weight=10.0, since=0.0)
    >>> d, s = decide(p, s, VersionStats(1000, 5, 0.20), VersionStats(120, 1, 0.21), now=60.0)
    >>> d.action, d.weight
    ('step', 50.0)
    >>> decide(p, s, VersionStats(1000, 5, 0.20), VersionStats(150, 30, 0.2), now=90.0)[0].action
    'rollback'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

Action = Literal["hold", "step", "promote", "rollback"]


@dataclass(frozen=True)
class AnalysisPolicy:
    min_requests: int = 200
    max_wait_s: float = 600.0
    steps: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0)  # canary weight in percent, in order
    max_error_rate_increase: float = 0.01  # absolute: 1 point more errors than the primary
    error_z: float = 2.33  # one-sided, ~1% false alarms
    max_ttft_p95_ratio: float = 1.25
    min_exact_match: float = 0.95  # greedy shadow pairs that must match exactly


@dataclass(frozen=True)
class VersionStats:
    """One version's counts since the current step began."""

    requests: int
    errors: int
    ttft_p95_s: float | None = None
    exact_match: float | None = None  # shadow pairs only (None: no shadow)


@dataclass(frozen=True)
class RolloutState:
    weight: float  # the canary's current weight, percent
    since: float  # when the current step began
    done: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    weight: float  # the canary's weight after the decision (0 after a rollback, 100 after promotion)
    reason: str


def error_z(primary: VersionStats, canary: VersionStats) -> float:
    """The one-sided two-proportion z statistic of canary vs primary error rates (pooled variance)."""
    n1, n2 = canary.requests, primary.requests
    if n1 == 0 or n2 == 0:
        return 0.0
    p1, p2 = canary.errors / n1, primary.errors / n2
    pooled = (canary.errors + primary.errors) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0 if p1 <= p2 else math.inf
    return (p1 - p2) / se


def decide(policy: AnalysisPolicy, state: RolloutState, primary: VersionStats, canary: VersionStats,
           now: float) -> tuple[Decision, RolloutState]:
    if state.done:
        return Decision("hold", state.weight, "the rollout has ended"), state
    waited = now - state.since
    if canary.requests < policy.min_requests and (waited < policy.max_wait_s or canary.requests == 0):
        return Decision("hold", state.weight, f"{canary.requests}/{policy.min_requests} canary requests, "
                        f"{waited:.0f}/{policy.max_wait_s:.0f} s"), state
    failed = _regression(policy, primary, canary)
    if failed is not None:
        return Decision("rollback", 0.0, failed), RolloutState(0.0, now, done=True)
    summary = (f"healthy: errors {canary.errors}/{canary.requests} vs {primary.errors}/{primary.requests}"
               + (f", TTFT p95 {canary.ttft_p95_s:.3f} vs {primary.ttft_p95_s:.3f} s"
                  if canary.ttft_p95_s is not None and primary.ttft_p95_s is not None else ""))
    nxt = next((w for w in policy.steps if w > state.weight), None)
    if nxt is None or nxt >= 100.0:  # healthy at the last step: all traffic to the canary
        return Decision("promote", 100.0, summary), RolloutState(100.0, now, done=True)
    return Decision("step", nxt, summary), replace(state, weight=nxt, since=now)


def _regression(policy: AnalysisPolicy, primary: VersionStats, canary: VersionStats) -> str | None:
    """Why the canary is worse than the primary, or None."""
    rate_c = canary.errors / canary.requests if canary.requests else 0.0
    rate_p = primary.errors / primary.requests if primary.requests else 0.0
    z = error_z(primary, canary)
    if rate_c - rate_p > policy.max_error_rate_increase and z >= policy.error_z:
        return f"error rate {rate_c:.2%} vs {rate_p:.2%} (z = {z:.1f})"
    if canary.ttft_p95_s is not None and primary.ttft_p95_s:
        ratio = canary.ttft_p95_s / primary.ttft_p95_s
        if ratio > policy.max_ttft_p95_ratio:
            return f"TTFT p95 {canary.ttft_p95_s:.3f} s is {ratio:.2f}x the primary's {primary.ttft_p95_s:.3f} s"
    if canary.exact_match is not None and canary.exact_match < policy.min_exact_match:
        return f"greedy exact match with the primary {canary.exact_match:.1%} < {policy.min_exact_match:.0%}"
    return None
