"""Shadow traffic's live part without Ray: taps on the primary, the mirror's fraction, drops, comparisons."""

from __future__ import annotations

import asyncio
import doctest
import random

from deployments.ingress import mirror as mirror_module
from deployments.ingress.generate import CallPolicy
from deployments.ingress.mirror import Mirror, Tap, TappedStream, ended
from deployments.ingress.versions import ShadowSpec
from deployments.messages import Chunk, ErrorInfo, GenerateRequest
from parallel import SamplingParams


class Shadow:
    """A replica handle's shape (``options(stream=True).generate_stream.remote``) answering fixed ids, or
    holding every request until released."""

    def __init__(self, ids: tuple[int, ...], hold: asyncio.Event | None = None) -> None:
        self.ids, self.hold, self.seen = ids, hold, []

    def options(self, stream: bool = False):
        return self

    @property
    def generate_stream(self):
        return self

    def remote(self, request: GenerateRequest):
        self.seen.append(request)

        async def chunks():
            if self.hold is not None:
                await self.hold.wait()
            yield Chunk("x", self.ids, "length", 3, len(self.ids))

        return Response(chunks())


class Response:
    """Serve's DeploymentResponseGenerator's shape: async iteration and cancel()."""

    def __init__(self, gen) -> None:
        self.gen, self.cancelled = gen, False

    def __anext__(self):
        return self.gen.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class Log:
    def __init__(self) -> None:
        self.lines = []

    def write(self, record, prompt=None, completion=None) -> None:
        self.lines.append(record)


def request(temperature: float = 0.0) -> GenerateRequest:
    return GenerateRequest("r1", prompt="x", params=SamplingParams(max_tokens=4, temperature=temperature),
                           model="tiny")


def test_doctests():
    assert doctest.testmod(mirror_module).failed == 0


def test_tap_tells_each_listener_once():
    heard = []
    tap = Tap(None, [lambda ids, how: heard.append((ids, how)), lambda ids, how: heard.append(how)])
    tap.add(Chunk("a", (1, 2), None, 1, 2))
    tap.finish("ok")
    tap.finish("error")
    assert heard == [((1, 2), "ok"), "ok"]
    assert [ended(200), ended(503), ended(400)] == ["ok", "error", "cancelled"]


def test_tapped_stream_passes_everything_through():
    class Stream:
        first = Chunk("a", (1,), None, 1, 1)

        async def rest(self):
            yield Chunk("b", (2,), None, 1, 2)
            yield ErrorInfo(503, "replica failed", code="replica_failed")

        def cancel(self):
            pass

    heard = []

    async def run():
        s = TappedStream(Stream(), Tap(None, [lambda ids, how: heard.append((ids, how))]))
        return [item async for item in s.rest()]

    items = asyncio.run(run())
    assert len(items) == 2 and isinstance(items[1], ErrorInfo)
    assert heard == [(None, "error")]


def test_greedy_pairs_are_compared_and_logged():
    log = Log()

    async def run():
        m = Mirror("tiny", "v2", ShadowSpec(app="v2"), Shadow((1, 2, 9)), CallPolicy(), log)
        listen = m.offer(request())
        listen((1, 2, 3, 4), "ok")  # the primary's ids
        for _ in range(100):
            if m.compared:
                break
            await asyncio.sleep(0.01)
        await m.close()
        return m

    m = asyncio.run(run())
    assert (m.compared, m.greedy_pairs, m.exact_pairs) == (1, 1, 0)
    line = log.lines[0]
    assert (line["kind"], line["exact"], line["first_diff"], line["length_delta"]) == ("shadow", False, 2, -1)
    assert line["request_id"] == "r1-shadow"


def test_a_failed_primary_is_not_compared():
    async def run():
        m = Mirror("tiny", "v2", ShadowSpec(app="v2"), Shadow((1,)), CallPolicy())
        m.offer(request())(None, "error")
        await asyncio.sleep(0.1)
        await m.close()
        return m

    m = asyncio.run(run())
    assert m.compared == 0


def test_a_full_queue_drops_at_once_and_counts_it():
    async def run():
        hold = asyncio.Event()
        shadow = Shadow((1,), hold)
        m = Mirror("tiny", "v2", ShadowSpec(app="v2", queue_size=2, concurrency=1), shadow, CallPolicy())
        offered = [m.offer(request()) for _ in range(10)]
        await asyncio.sleep(0.05)  # the one worker took one copy and waits on the shadow
        more = [m.offer(request()) for _ in range(5)]
        hold.set()
        await m.close()
        return m, offered, more

    m, offered, more = asyncio.run(run())
    assert sum(o is not None for o in offered) == 2  # the queue's room; the worker had not started yet
    assert sum(o is not None for o in more) == 1  # one slot freed by the worker
    assert m.queue.dropped == 12


def test_the_fraction_mirrors_that_share():
    async def run():
        m = Mirror("tiny", "v2", ShadowSpec(app="v2", fraction=0.25, queue_size=4096), Shadow((1,)), CallPolicy(),
                   rng=random.Random(7))
        n = sum(m.offer(request()) is not None for _ in range(400))
        await m.close()
        return n

    n = asyncio.run(run())
    assert abs(n - 100) <= 4 * (400 * 0.25 * 0.75) ** 0.5
