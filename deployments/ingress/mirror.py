"""Shadow traffic, live: a share of a model's requests copied to a shadow version, compared, never answered.

The ingress ``offer``s a copy when the primary's request starts and goes on at once (``shadow.MirrorQueue``:
a full queue drops the copy, counted). ``concurrency`` workers send the copies to the shadow, each bounded by
``timeout_s``, then wait for the primary's output (a ``Tap`` on the primary's chunks hands it over when the
primary ends) and record the pair's ``shadow.divergence``: as metrics (``modelfleet_shadow_*``) and as a
request-log line. The client's response comes only from the primary; a failed, slow or dropped shadow
changes nothing the client sees, and a primary that failed or was left by its client is not compared.

Example:
    >>> import asyncio
    >>> from deployments.messages import Chunk
    >>> async def demo():
    ...     got = asyncio.get_running_loop().create_future()
    ...     tap = Tap(Chunk("a", (1,), None, 2, 1), [lambda ids, how: got.set_result((ids, how))])
    ...     tap.add(Chunk("b", (2, 3), "stop", 2, 3)); tap.finish("ok")
    ...     return await got
    >>> asyncio.run(demo())
    ((1, 2, 3), 'ok')
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from deployments import metrics
from deployments.ingress.generate import CallPolicy, generate_whole
from deployments.ingress.shadow import MirrorQueue, divergence
from deployments.ingress.versions import ShadowSpec
from deployments.messages import Chunk, ErrorInfo, GenerateRequest

logger = logging.getLogger("ray.serve")


Listener = Callable[[tuple[int, ...] | None, str], None]


class Tap:
    """Collects a primary's token ids and tells each listener once how it ended: ``(ids, "ok")``, or
    ``(None, "error")`` for a server error (5xx), ``(None, "cancelled")`` when its client left or it was
    refused (4xx): not the version's fault."""

    def __init__(self, first: Chunk | None, listeners: list[Listener]) -> None:
        self.ids: list[int] = list(first.token_ids) if first is not None else []
        self._listeners: list[Listener] | None = listeners

    def add(self, chunk: Chunk) -> None:
        self.ids.extend(chunk.token_ids)

    def finish(self, how: str) -> None:
        if self._listeners is not None:
            listeners, self._listeners = self._listeners, None
            for listen in listeners:
                listen(tuple(self.ids) if how == "ok" else None, how)


def ended(status: int) -> str:
    """How a request that got ``status`` ended, for a Tap."""
    return "ok" if status < 400 else "error" if status >= 500 else "cancelled"


class TappedStream:
    """A primary's stream (``routes.Stream``) passed through unchanged, its token ids tapped."""

    def __init__(self, stream: Any, tap: Tap) -> None:
        self._stream, self._tap = stream, tap
        self.first = stream.first
        if stream.first is not None:
            tap.add(stream.first)

    async def rest(self) -> AsyncIterator[Chunk | ErrorInfo]:
        how = "cancelled"  # left mid-way (the generator closed): the client went away
        try:
            async for item in self._stream.rest():
                if isinstance(item, ErrorInfo):
                    self._tap.finish(ended(item.status))
                else:
                    self._tap.add(item)
                yield item
            how = "ok"
        finally:
            self._tap.finish(how)

    def cancel(self) -> None:
        self._tap.finish("cancelled")
        self._stream.cancel()


@dataclasses.dataclass
class _Copy:
    request: GenerateRequest
    primary: asyncio.Future  # the primary's token ids, or None
    primary_started: float
    greedy: bool


class Mirror:
    """One model's shadow: a bounded queue and its workers, sending copies to ``handle``."""

    def __init__(self, model: str, shadow_version: str, spec: ShadowSpec, handle: Any, policy: CallPolicy,
                 log: Any = None, rng: random.Random | None = None) -> None:
        self.model, self.version, self.spec, self.handle, self.policy = model, shadow_version, spec, handle, policy
        self.log, self.rng = log, rng or random.Random()
        self.queue = MirrorQueue(spec.queue_size)
        self.workers: list[asyncio.Task] = []
        self.compared = self.failed = self.greedy_pairs = self.exact_pairs = 0

    def offer(self, request: GenerateRequest) -> Listener | None:
        """Maybe mirror ``request`` (by the spec's fraction); then the listener that hands the primary's
        output to the comparison (for the primary's Tap), else None."""
        if self.rng.random() >= self.spec.fraction:
            return None
        if not self.workers:
            self.workers = [asyncio.get_running_loop().create_task(self._work()) for _ in range(self.spec.concurrency)]
        primary: asyncio.Future = asyncio.get_running_loop().create_future()
        copy = _Copy(dataclasses.replace(request, request_id=f"{request.request_id}-shadow",
                                         deadline=time.time() + self.spec.timeout_s, traceparent=None),
                     primary, time.monotonic(), request.params.temperature == 0)
        if not self.queue.offer(copy):
            self._count("dropped")
            return None
        self._count("mirrored")

        def listen(ids: tuple[int, ...] | None, how: str) -> None:
            if not primary.done():
                primary.set_result((ids, time.monotonic()))

        return listen

    async def close(self) -> None:
        for task in self.workers:
            task.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)

    def _count(self, result: str) -> None:
        metrics.SHADOW_REQUESTS.labels(self.model, self.version, result).inc()

    async def _work(self) -> None:
        while True:
            copy: _Copy = await self.queue.take()
            try:
                await self._compare(copy)
            except asyncio.CancelledError:
                raise
            except Exception:  # a shadow must never take its worker down
                logger.exception("shadow %s of %s: comparing request %s failed", self.version, self.model,
                                 copy.request.request_id)

    async def _compare(self, copy: _Copy) -> None:
        sent = time.monotonic()
        try:
            chunks = await asyncio.wait_for(generate_whole(self.handle, copy.request, self.policy),
                                            timeout=self.spec.timeout_s)
        except Exception as err:  # refused, failed, too slow: counted; the primary never knew
            self.failed += 1
            self._count("failed")
            logger.info("shadow %s of %s: request %s failed (%s)", self.version, self.model,
                        copy.request.request_id, type(err).__name__)
            return
        shadow_s = time.monotonic() - sent
        shadow_ids = tuple(i for c in chunks for i in c.token_ids)
        try:
            ids, ended = await asyncio.wait_for(copy.primary, timeout=self.spec.timeout_s)
        except TimeoutError:
            ids, ended = None, 0.0
        if ids is None:  # the primary failed or its client left: nothing to compare with
            self._count("primary_failed")
            return
        d = divergence(ids, shadow_ids, copy.greedy, ended - copy.primary_started, shadow_s)
        self.compared += 1
        self._count("compared")
        labels = (self.model, self.version)
        if d.exact is not None:
            self.greedy_pairs += 1
            self.exact_pairs += d.exact
            metrics.SHADOW_GREEDY_PAIRS.labels(*labels, str(d.exact).lower()).inc()
        if d.first_diff is not None:
            metrics.SHADOW_FIRST_DIFF.labels(*labels).observe(d.first_diff)
        metrics.SHADOW_LENGTH_DELTA.labels(*labels).observe(d.length_delta)
        metrics.SHADOW_LATENCY_DELTA.labels(*labels).observe(d.latency_delta_s)
        if self.log is not None:
            self.log.write({"ts": round(time.time(), 6), "request_id": copy.request.request_id, "model": self.model,
                            "shadow_version": self.version, "kind": "shadow", "greedy": copy.greedy,
                            "exact": d.exact, "first_diff": d.first_diff, "length_delta": d.length_delta,
                            "latency_delta_s": d.latency_delta_s, "shadow_tokens": len(shadow_ids),
                            "primary_tokens": len(ids)})
