"""Token buckets and quota windows: the arithmetic of rate limits, pure (no clock of their own, no Ray).

A ``Bucket`` is the classic token bucket (Turner 1986; the form Envoy and Stripe describe): capacity ``b``,
refill rate ``r`` per second, level ``L`` in [-inf, b]. Taking ``n`` succeeds only when ``L >= n``; what a
request uses beyond what it reserved is charged afterwards and may push ``L`` below zero (a debt the refill
pays off before anyone is admitted again). Over any interval of length ``T`` a bucket that starts full hands
out at most ``b + r*T``: for a per-minute limit ``m``, ``b = m`` and ``r = m / 60``.

A ``Window`` is a quota: ``b`` per calendar period (UTC hour, day, ISO week, month), no refill within it.

Example:
    >>> b = Bucket.full(capacity=60, rate=1.0, now=0.0)
    >>> b.take(60, now=0.0), b.take(1, now=0.0), b.wait(1, now=0.0), b.take(1, now=1.0)
    (True, False, 1.0, True)
    >>> w = Window.full(100, "day", now=0.0)
    >>> w.take(100, now=10.0), w.take(1, now=10.0), w.wait(1, now=10.0)
    (True, False, 86390.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


class _Level:
    """What buckets and windows share: a ``level`` that ``refill`` brings up to date and ``wait`` judges."""

    level: float
    capacity: float

    def refill(self, now: float) -> None:
        raise NotImplementedError

    def wait(self, n: float, now: float) -> float:
        raise NotImplementedError

    def take(self, n: float, now: float) -> bool:
        if self.wait(n, now) > 0:
            return False
        self.level -= n
        return True

    def take_up_to(self, n: float, now: float) -> float:
        """As much of ``n`` as there is (at least 0): what a lease gets beyond its need."""
        self.refill(now)
        got = max(0.0, min(n, self.level))
        self.level -= got
        return got

    def put(self, n: float, now: float) -> None:
        """Give back (``n`` > 0, capped at the capacity) or charge (``n`` < 0: may go into debt)."""
        self.refill(now)
        self.level = min(self.capacity, self.level + n)


@dataclass
class Bucket(_Level):
    capacity: float
    rate: float  # per second
    level: float
    at: float  # the time ``level`` refers to

    @classmethod
    def full(cls, capacity: float, rate: float, now: float) -> Bucket:
        return cls(capacity, rate, capacity, now)

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
            self.at = now

    def wait(self, n: float, now: float) -> float:
        """Seconds until ``n`` can be taken (0: now; inf: never, ``n`` exceeds the capacity)."""
        self.refill(now)
        if self.level >= n:
            return 0.0
        if n > self.capacity or self.rate <= 0:
            return math.inf
        return (n - self.level) / self.rate

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self.refill(now)
        return max(0.0, self.capacity - self.level) / self.rate if self.rate > 0 else math.inf

    def resize(self, capacity: float, rate: float, now: float) -> None:
        """A new limit (the key file changed): the level keeps what was used, clipped to the new capacity."""
        self.refill(now)
        self.level = min(capacity, self.level + (capacity - self.capacity))
        self.capacity, self.rate = capacity, rate


def period_end(period: str, now: float) -> float:
    """The first instant (unix time) of the calendar period after the one holding ``now`` (UTC)."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "hour":
        nxt = t.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    elif period == "day":
        nxt = t.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    elif period == "week":  # ISO weeks start on Monday
        nxt = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(7)
    elif period == "month":
        nxt = (t.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return nxt.timestamp()


@dataclass
class Window(_Level):
    """A quota: ``capacity`` per period; the level refills completely at each period's end."""

    capacity: float
    period: str
    level: float
    ends: float  # unix time

    @classmethod
    def full(cls, capacity: float, period: str, now: float) -> Window:
        return cls(capacity, period, capacity, period_end(period, now))

    def refill(self, now: float) -> None:
        if now >= self.ends:
            self.level = self.capacity + min(0.0, self.level)  # a debt carries over into the next period
            self.ends = period_end(self.period, now)

    def wait(self, n: float, now: float) -> float:
        self.refill(now)
        if self.level >= n:
            return 0.0
        return math.inf if n > self.capacity else self.ends - now

    def reset_s(self, now: float) -> float:
        self.refill(now)
        return self.ends - now

    def resize(self, capacity: float, period: str, now: float) -> None:
        self.refill(now)
        self.level = min(capacity, self.level + (capacity - self.capacity))
        if period != self.period:
            self.period, self.ends = period, period_end(period, now)
        self.capacity = capacity
