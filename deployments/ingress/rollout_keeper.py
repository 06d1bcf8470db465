"""Automated canary analysis, live: one authority per cluster that judges each canary and moves its weight.

Every router replica counts, per version of an analysed model, requests, server errors (5xx) and TTFTs
(``VersionCounts``), and every ``interval_s`` hands its counts to the cluster's ``RolloutKeeper`` (a
detached Ray actor, like the rate-limit state) and takes back the weights to route by. The keeper adds up
all routers' counts since the current step began and, at most once per interval, calls the pure policy
``rollout.decide``; a step, promotion or rollback starts a new step (the counts restart). The caller whose
report produced a decision logs it and counts it (``modelfleet_canary_decisions_total``): once per decision.

The analysis belongs to its spec: a ``serve deploy`` that changes the model's versions or ``analysis`` starts
it afresh from the table's weights; redeploying the same spec keeps the decided weights. If the keeper's
process dies Ray restarts it empty: the analysis restarts from the table's weights (never from a guess).

Example:
    >>> spec = AnalysisSpec(canary="v2", min_requests=10, steps=(10.0, 50.0, 100.0))
    >>> a = Analysis(spec, {"v1": 90.0, "v2": 10.0}, now=0.0)
    >>> a.add({"v1": VersionCounts(100, 0, [0.2] * 100), "v2": VersionCounts(12, 0, [0.2] * 12)})
    >>> d = a.maybe_decide(now=10.0); d.action, a.weights()
    ('step', {'v1': 50.0, 'v2': 50.0})
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from deployments.ingress.rollout import AnalysisPolicy, Decision, RolloutState, VersionStats, decide
from deployments.ingress.versions import AnalysisSpec
from deployments.singleton import detached

logger = logging.getLogger("ray.serve")
ACTOR_NAME = "modelfleet-rollout-v1"
ACTOR_NAMESPACE = "modelfleet"
MAX_TTFTS = 4096  # per version and step: enough for a p95, bounded whatever the traffic


@dataclass(frozen=True)
class VersionReport:
    """One version's counts since a router's last report: the message a router sends the keeper."""

    requests: int
    errors: int
    ttfts: tuple[float, ...]
    greedy_pairs: int = 0
    exact_pairs: int = 0


@dataclass
class VersionCounts:
    """One version's requests, server errors and TTFT samples (seconds) since the last report."""

    requests: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)
    greedy_pairs: int = 0  # with a shadow of this version: greedy pairs compared, and those that matched
    exact_pairs: int = 0

    def record(self, ok: bool, ttft_s: float | None) -> None:
        self.requests += 1
        self.errors += not ok
        if ttft_s is not None and len(self.ttfts) < MAX_TTFTS:
            self.ttfts.append(ttft_s)

    def report(self) -> VersionReport:
        return VersionReport(self.requests, self.errors, tuple(self.ttfts), self.greedy_pairs, self.exact_pairs)

    def merge(self, other: VersionCounts | VersionReport) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.ttfts.extend(other.ttfts[:max(0, MAX_TTFTS - len(self.ttfts))])
        self.greedy_pairs += other.greedy_pairs
        self.exact_pairs += other.exact_pairs

    def stats(self) -> VersionStats:
        return VersionStats(self.requests, self.errors, p95(self.ttfts),
                            self.exact_pairs / self.greedy_pairs if self.greedy_pairs else None)


def p95(xs: list[float]) -> float | None:
    """The nearest-rank 95th percentile (None without samples)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, -(-95 * len(s) // 100) - 1)]


def policy_of(spec: AnalysisSpec) -> AnalysisPolicy:
    return AnalysisPolicy(min_requests=spec.min_requests, max_wait_s=spec.max_wait_s, steps=spec.steps,
                          max_error_rate_increase=spec.max_error_rate_increase, error_z=spec.error_z,
                          max_ttft_p95_ratio=spec.max_ttft_p95_ratio, min_exact_match=spec.min_exact_match)


class Analysis:
    """One model's canary analysis: the counts of the current step and the rollout's state."""

    def __init__(self, spec: AnalysisSpec, versions: dict[str, float], now: float) -> None:
        self.spec, self.policy = spec, policy_of(spec)
        self.canary = spec.canary
        self.primary = next(a for a in versions if a != spec.canary)
        total = sum(versions.values())
        self.state = RolloutState(weight=round(100.0 * versions[self.canary] / total, 6), since=now)
        self.counts = {a: VersionCounts() for a in versions}
        self.last_at = now
        self.decisions: list[Decision] = []

    def add(self, counts: dict[str, VersionCounts | VersionReport]) -> None:
        for app, c in counts.items():
            if app in self.counts:
                self.counts[app].merge(c)

    def maybe_decide(self, now: float) -> Decision | None:
        """A decision when ``interval_s`` passed since the last one (else None)."""
        if now - self.last_at < self.spec.interval_s:
            return None
        self.last_at = now
        before = self.state
        d, self.state = decide(self.policy, self.state, self.counts[self.primary].stats(),
                               self.counts[self.canary].stats(), now)
        if self.state is not before and self.state.since != before.since:  # a new step: its own counts
            self.counts = {a: VersionCounts() for a in self.counts}
        self.decisions.append(d)
        del self.decisions[:-64]
        return d

    def weights(self) -> dict[str, float]:
        w = self.state.weight
        return {self.primary: round(100.0 - w, 6), self.canary: w}


class Keeper:
    """The analyses of every model, keyed by model, each tied to the spec it started from (no Ray)."""

    def __init__(self) -> None:
        self.analyses: dict[str, tuple[str, Analysis]] = {}

    def sync(self, model: str, spec: dict[str, Any], versions: dict[str, float],
             counts: dict[str, VersionReport], now: float) -> tuple[dict[str, float], Decision | None]:
        """Add one router's counts; maybe decide; the weights to route by and the decision it produced."""
        fingerprint = json.dumps([spec, versions], sort_keys=True)
        held = self.analyses.get(model)
        if held is None or held[0] != fingerprint:
            held = (fingerprint, Analysis(AnalysisSpec.model_validate(spec), versions, now))
            self.analyses[model] = held
        analysis = held[1]
        analysis.add(counts)
        decision = analysis.maybe_decide(now)
        if decision is not None and decision.action != "hold":
            logger.info("canary analysis of %s (%s vs %s): %s -> weight %.1f%%: %s", model, analysis.canary,
                        analysis.primary, decision.action, decision.weight, decision.reason)
        return analysis.weights(), decision

    def status(self) -> dict[str, Any]:
        return {m: {"canary": a.canary, "primary": a.primary, "weights": a.weights(), "done": a.state.done,
                    "decisions": [(d.action, d.weight, d.reason) for d in a.decisions[-8:]]}
                for m, (_, a) in self.analyses.items()}


class RolloutKeeper:
    """The Ray actor around ``Keeper`` (one per cluster, detached, restarted empty by Ray if it dies)."""

    def __init__(self) -> None:
        import time

        self.keeper, self.clock = Keeper(), time.time

    def sync(self, model: str, spec: dict[str, Any], versions: dict[str, float],
             counts: dict[str, VersionReport]) -> tuple[dict[str, float], Decision | None]:
        return self.keeper.sync(model, spec, versions, counts, self.clock())

    def status(self) -> dict[str, Any]:
        return self.keeper.status()


def keeper_actor() -> Any:
    """The cluster's RolloutKeeper, created on first use."""
    return detached(RolloutKeeper, ACTOR_NAME, namespace=ACTOR_NAMESPACE)


class KeeperClient:
    """A router's side: counts per model and version, handed over by ``sync`` (bounded by ``timeout_s``)."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.timeout_s, self._actor = timeout_s, None
        self.counts: dict[str, dict[str, VersionCounts]] = {}

    def record(self, model: str, app: str, ok: bool, ttft_s: float | None) -> None:
        self.counts.setdefault(model, {}).setdefault(app, VersionCounts()).record(ok, ttft_s)

    async def sync(self, model: str, spec: AnalysisSpec, versions: dict[str, float],
                   shadow: tuple[str, int, int] | None = None) -> tuple[dict[str, float], Decision | None]:
        """``shadow``: (the shadow's app, greedy pairs, exact pairs) since the last sync; it is evidence about
        the canary when the shadow *is* the canary's application (it then also gets copies of the primary's
        requests, and ``min_exact_match`` applies)."""
        counts = self.counts.pop(model, {})
        if shadow is not None and shadow[0] == spec.canary:
            c = counts.setdefault(spec.canary, VersionCounts())
            c.greedy_pairs += shadow[1]
            c.exact_pairs += shadow[2]
        try:
            if self._actor is None:
                self._actor = await asyncio.wait_for(asyncio.to_thread(keeper_actor), self.timeout_s)
            report = {app: c.report() for app, c in counts.items()}
            return await asyncio.wait_for(self._actor.sync.remote(model, spec.model_dump(mode="json"), versions,
                                                                  report), self.timeout_s)
        except Exception:
            self._actor = None
            for app, c in counts.items():  # not lost: handed over with the next sync
                self.counts.setdefault(model, {}).setdefault(app, VersionCounts()).merge(c)
            raise
