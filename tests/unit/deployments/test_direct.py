"""The direct path's stream over a generation in this process: refusals before the response, the request's
deadline enforced (504, the generation closed so the engine aborts it), cancel closing it."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.direct import LocalStream
from deployments.messages import Chunk, ErrorInfo, GenerateRequest, ServeError
from parallel.sampling_params import SamplingParams


class Generation:
    """Stands for the replica's generate_stream: chunks every ``gap_s``; records whether it was closed."""

    def __init__(self, n: int, gap_s: float, first: Chunk | ErrorInfo | None = None) -> None:
        self.n, self.gap_s, self.first, self.closed = n, gap_s, first, False

    async def __call__(self, request: GenerateRequest):
        try:
            if self.first is not None:
                yield self.first
            for i in range(self.n):
                await asyncio.sleep(self.gap_s)
                yield Chunk(f"t{i}", (i,), None, 3, i + 1)
        finally:
            self.closed = True  # the engine's abort runs here


def request(deadline_in_s: float | None) -> GenerateRequest:
    return GenerateRequest("r-1", prompt="x", params=SamplingParams(max_tokens=8),
                           deadline=time.time() + deadline_in_s if deadline_in_s is not None else None)


def test_chunks_flow_and_the_generation_ends():
    gen = Generation(4, 0.001)

    async def main():
        s = LocalStream(gen, request(30))
        first = await s.start()
        return [first.text] + [c.text async for c in s.rest()]

    assert asyncio.run(main()) == ["t0", "t1", "t2", "t3"] and gen.closed


def test_a_refusal_surfaces_before_the_response():
    gen = Generation(3, 0.001, first=ErrorInfo(503, "full", code="overloaded", retry_after_s=2))
    with pytest.raises(ServeError) as caught:
        asyncio.run(LocalStream(gen, request(30)).start())
    assert caught.value.info.code == "overloaded" and gen.closed


def test_the_deadline_before_the_first_chunk_is_a_504():
    gen = Generation(3, 5.0)

    async def main():
        s = LocalStream(gen, request(0.05))
        with pytest.raises(ServeError) as caught:
            await s.start()
        await asyncio.sleep(0.01)  # the close was scheduled
        return caught.value.info

    info = asyncio.run(main())
    assert (info.status, info.code) == (504, "timeout") and gen.closed


def test_the_deadline_mid_stream_ends_it_with_a_504_item():
    gen = Generation(100, 0.02)

    async def main():
        s = LocalStream(gen, request(0.2))
        await s.start()
        return [item async for item in s.rest()]

    items = asyncio.run(main())
    assert isinstance(items[-1], ErrorInfo) and items[-1].status == 504
    assert 0 < len(items) - 1 < 99 and gen.closed  # some chunks, then the deadline, then the abort


def test_cancel_closes_the_generation():
    gen = Generation(100, 0.01)

    async def main():
        s = LocalStream(gen, request(None))
        await s.start()
        s.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert gen.closed
