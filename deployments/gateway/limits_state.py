"""The one authoritative rate-limit state of a cluster: every bucket of every key, handed out as leases.

Ingress processes (router replicas, model replicas answering HTTP) never count on their own: each takes a
*lease* of a bucket, a number of requests or tokens deducted here at once, and admits locally until it is
used up (``deployments/gateway/ratelimit.py``). Nothing is ever admitted that was not first deducted here,
so leases cannot multiply a limit the way per-replica counters do (LiteLLM #40291); they can only hold
back capacity for a while (the lease slack, see ratelimit.py), and give it back when idle.

``LimitTable`` is the state and its rules (pure, unit-tested alone); ``LimitsActor`` the detached Ray actor
that holds one (``limits_actor()`` finds or creates it); ``LocalState`` the same interface in-process.
The table keeps its own clock (time.time() where it runs): leases carry amounts, never timestamps, so the
clocks of other hosts do not matter.

Example:
    >>> t = LimitTable()
    >>> spec = Spec("bucket", 60, 1.0)  # 60 per minute
    >>> t.grant([Ask(("k", "*", "requests"), spec, need=1, want=3)], now=0.0).granted
    (3.0,)
    >>> t.grant([Ask(("k", "*", "requests"), spec, need=58, want=58)], now=0.0).granted  # 57 left
    >>> t.grant([Ask(("k", "*", "requests"), spec, need=58, want=58)], now=1.0).granted
    (58.0,)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.gateway.token_bucket import Bucket, Window

logger = logging.getLogger("ray.serve")

ACTOR_NAME = "modelfleet-limits-v1"
ACTOR_NAMESPACE = "modelfleet"

BucketKey = tuple[str, str, str]  # (key id, scope: "*" or a model glob, kind: requests | tokens | quota)


@dataclass(frozen=True)
class Spec:
    """What a bucket is: ``bucket`` (capacity, refill per second) or ``window`` (capacity, period)."""

    kind: str
    capacity: float
    rate: float = 0.0
    period: str = ""


@dataclass(frozen=True)
class Ask:
    bucket: BucketKey
    spec: Spec
    need: float  # granted only if all of it is there
    want: float  # need plus the lease beyond it, granted as far as there is


@dataclass(frozen=True)
class Reply:
    """``granted`` per ask (None: refused, nothing taken); ``levels`` and ``resets_s`` after the grant, for the
    x-ratelimit headers; ``retry_after_s`` and ``refused`` (the first bucket short) when refused."""

    granted: tuple[float, ...] | None
    levels: tuple[float, ...]
    resets_s: tuple[float, ...]
    retry_after_s: float = 0.0
    refused: int = -1


class LimitTable:
    """Buckets by key; created full on first use, resized when a key's limits change."""

    def __init__(self) -> None:
        self.buckets: dict[BucketKey, Bucket | Window] = {}

    def _bucket(self, key: BucketKey, spec: Spec, now: float) -> Bucket | Window:
        b = self.buckets.get(key)
        if spec.kind == "window":
            if not isinstance(b, Window):
                b = self.buckets[key] = Window.full(spec.capacity, spec.period, now)
            elif (b.capacity, b.period) != (spec.capacity, spec.period):
                b.resize(spec.capacity, spec.period, now)
        else:
            if not isinstance(b, Bucket):
                b = self.buckets[key] = Bucket.full(spec.capacity, spec.rate, now)
            elif (b.capacity, b.rate) != (spec.capacity, spec.rate):
                b.resize(spec.capacity, spec.rate, now)
        return b

    def grant(self, asks: list[Ask], now: float | None = None) -> Reply:
        """All needs or nothing; then each ask's lease as far as its bucket allows."""
        now = time.time() if now is None else now
        buckets = [self._bucket(a.bucket, a.spec, now) for a in asks]
        waits = [b.wait(a.need, now) for a, b in zip(asks, buckets, strict=True)]
        worst = max(range(len(asks)), key=lambda i: waits[i], default=-1)
        if worst >= 0 and waits[worst] > 0:
            return Reply(None, tuple(b.level for b in buckets), tuple(b.reset_s(now) for b in buckets),
                         waits[worst], worst)
        granted = []
        for a, b in zip(asks, buckets, strict=True):
            b.level -= a.need
            granted.append(float(a.need + b.take_up_to(max(0.0, a.want - a.need), now)))
        return Reply(tuple(granted), tuple(b.level for b in buckets), tuple(b.reset_s(now) for b in buckets))

    def settle(self, deltas: list[tuple[BucketKey, Spec, float]], now: float | None = None) -> None:
        """Leases given back (> 0) and use beyond what was leased (< 0, a debt)."""
        now = time.time() if now is None else now
        for key, spec, amount in deltas:
            self._bucket(key, spec, now).put(amount, now)

    def usage(self) -> dict[str, Any]:
        """The quota windows, to survive a restart (rate buckets refill within a minute anyway)."""
        return {"|".join(k): [w.capacity, w.period, w.level, w.ends]
                for k, w in self.buckets.items() if isinstance(w, Window)}

    def restore(self, usage: dict[str, Any]) -> None:
        for k, (capacity, period, level, ends) in usage.items():
            key = tuple(k.split("|", 2))
            if len(key) == 3:
                self.buckets[key] = Window(float(capacity), str(period), float(level), float(ends))  # type: ignore[index]


class LocalState:
    """The state in this process (tests, a single-process server): the actor's interface, without Ray."""

    def __init__(self, table: LimitTable | None = None) -> None:
        self.table = table or LimitTable()
        self.calls = 0  # round trips, so benchmarks and tests can count them

    async def grant(self, asks: list[Ask]) -> Reply:
        self.calls += 1
        return self.table.grant(asks)

    async def settle(self, deltas: list[tuple[BucketKey, Spec, float]]) -> None:
        self.calls += 1
        self.table.settle(deltas)


class LimitsActor:
    """The Ray actor around one LimitTable; with ``usage_file``, quota use is saved every 10 s and loaded
    at start (a restarted actor keeps the month's quota, and starts rate buckets full)."""

    def __init__(self, usage_file: str | None = None) -> None:
        self.table, self.usage_file = LimitTable(), usage_file
        self.calls = 0
        self._saved_at = 0.0
        if usage_file and Path(usage_file).is_file():
            try:
                self.table.restore(json.loads(Path(usage_file).read_text()))
            except (ValueError, OSError) as err:
                logger.error("rate-limit usage file %s unreadable (%s): quotas start afresh", usage_file, err)

    def grant(self, asks: list[Ask]) -> Reply:
        self.calls += 1
        return self.table.grant(asks)

    def settle(self, deltas: list[tuple[BucketKey, Spec, float]]) -> None:
        self.calls += 1
        self.table.settle(deltas)
        self._maybe_save()

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "buckets": len(self.table.buckets),
                "levels": {"|".join(k): round(b.level, 3) for k, b in self.table.buckets.items()}}

    def _maybe_save(self) -> None:
        now = time.time()
        if not self.usage_file or now - self._saved_at < 10:
            return
        self._saved_at = now
        tmp = f"{self.usage_file}.tmp"
        try:
            Path(tmp).write_text(json.dumps(self.table.usage()))
            os.replace(tmp, self.usage_file)
        except OSError as err:
            logger.error("cannot save rate-limit usage to %s: %s", self.usage_file, err)


class ActorState:
    """The actor's interface for a LeaseLimiter: the handle is found lazily, off the event loop; a call that
    takes longer than ``timeout_s`` (the actor restarting, its node gone) fails, so a request never waits
    on the state for longer than that (the limiter then enforces the limits in its own process)."""

    def __init__(self, usage_file: str | None = None, timeout_s: float = 2.0) -> None:
        self.usage_file, self.timeout_s, self._actor = usage_file, timeout_s, None

    async def _handle(self) -> Any:
        if self._actor is None:
            self._actor = await asyncio.wait_for(asyncio.to_thread(limits_actor, self.usage_file), self.timeout_s)
        return self._actor

    async def grant(self, asks: list[Ask]) -> Reply:
        try:
            return await asyncio.wait_for((await self._handle()).grant.remote(asks), self.timeout_s)
        except Exception:
            self._actor = None  # found again next time (the actor restarted, or was never there)
            raise

    async def settle(self, deltas: list[tuple[BucketKey, Spec, float]]) -> None:
        try:
            await asyncio.wait_for((await self._handle()).settle.remote(deltas), self.timeout_s)
        except Exception:
            self._actor = None
            raise


def limits_actor(usage_file: str | None = None) -> Any:
    """The cluster's LimitsActor, created on first use (detached, restarted by Ray if its process dies)."""
    from deployments.singleton import detached

    return detached(LimitsActor, ACTOR_NAME, usage_file, namespace=ACTOR_NAMESPACE)


def finite(x: float, cap: float = 1e9) -> float:
    return cap if math.isinf(x) else x
