"""Shadow traffic's two pure parts: the bounded mirror queue and the divergence of a primary/shadow pair.

Mirroring must never cost the primary anything: the ingress ``offer``s a copy of the request and moves on;
a full queue drops the copy at once (counted), never blocks, never grows. A worker drains the queue at the
shadow's own pace. Dropping the *newest* copy under load keeps what is queued meaningful (it is already
paid for) and makes the drop count the exact measure of shed shadow traffic.

``divergence`` compares the two outputs: for greedy requests (temperature 0) whether the token ids match
exactly and the position of the first difference; for all, length and latency deltas.

Example:
    >>> q = MirrorQueue(capacity=2)
    >>> [q.offer(i) for i in range(3)], q.dropped
    ([True, True, False], 1)
    >>> divergence((1, 2, 3, 4), (1, 2, 9), greedy=True, primary_s=0.5, shadow_s=0.7)
    Divergence(exact=False, first_diff=2, length_delta=-1, latency_delta_s=0.2)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class MirrorQueue:
    """A bounded queue of mirrored requests; ``offer`` never waits."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a mirror queue needs room for at least one request")
        self._queue: asyncio.Queue[Any] | None = None
        self.capacity = capacity
        self.offered = self.dropped = 0

    def _q(self) -> asyncio.Queue[Any]:
        if self._queue is None:
            self._queue = asyncio.Queue(self.capacity)
        return self._queue

    def offer(self, item: Any) -> bool:
        """Queue a copy; False (and counted) when full."""
        self.offered += 1
        try:
            self._q().put_nowait(item)
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            return False

    async def take(self) -> Any:
        return await self._q().get()

    def __len__(self) -> int:
        return self._q().qsize()


@dataclass(frozen=True)
class Divergence:
    exact: bool | None  # greedy pairs only (sampled outputs may differ by design)
    first_diff: int | None  # index of the first differing token (None: no difference within the shorter)
    length_delta: int  # shadow tokens - primary tokens
    latency_delta_s: float  # shadow e2e - primary e2e


def divergence(primary: Sequence[int], shadow: Sequence[int], greedy: bool, primary_s: float,
               shadow_s: float) -> Divergence:
    first = next((i for i, (a, b) in enumerate(zip(primary, shadow, strict=False)) if a != b), None)
    if first is None and len(primary) != len(shadow):
        first = min(len(primary), len(shadow))  # one is a prefix of the other: they part where it ends
    return Divergence(exact=(first is None) if greedy else None, first_diff=first,
                      length_delta=len(shadow) - len(primary), latency_delta_s=round(shadow_s - primary_s, 6))
