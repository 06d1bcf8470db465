"""Shadow traffic's pure parts: a mirror queue that never blocks and counts its drops; pair divergence."""

from __future__ import annotations

import asyncio
import doctest

import pytest

from deployments.ingress import shadow
from deployments.ingress.shadow import MirrorQueue, divergence


def test_offer_never_blocks_and_counts_drops_under_overload():
    async def go():
        q = MirrorQueue(capacity=8)
        accepted = sum(q.offer(i) for i in range(1000))  # a burst far beyond the shadow's pace
        got = [await q.take() for _ in range(len(q))]
        return q, accepted, got

    q, accepted, got = asyncio.run(go())
    assert accepted == 8 and q.dropped == 992 and q.offered == 1000
    assert got == list(range(8))  # the queued ones, in order; the newest were dropped


def test_a_drained_queue_accepts_again():
    async def go():
        q = MirrorQueue(capacity=1)
        assert q.offer("a") and not q.offer("b")
        assert await q.take() == "a"
        return q.offer("c"), q.dropped

    assert asyncio.run(go()) == (True, 1)
    with pytest.raises(ValueError):
        MirrorQueue(0)


def test_divergence_of_greedy_and_sampled_pairs():
    same = divergence((1, 2, 3), (1, 2, 3), greedy=True, primary_s=1.0, shadow_s=1.25)
    assert same.exact and same.first_diff is None and same.length_delta == 0 and same.latency_delta_s == 0.25
    prefix = divergence((1, 2, 3), (1, 2), greedy=True, primary_s=1.0, shadow_s=0.5)
    assert not prefix.exact and prefix.first_diff == 2 and prefix.length_delta == -1
    sampled = divergence((1, 2), (3, 4, 5), greedy=False, primary_s=0.0, shadow_s=0.0)
    assert sampled.exact is None and sampled.first_diff == 0 and sampled.length_delta == 1


def test_the_module_example_runs():
    assert doctest.testmod(shadow).failed == 0
