"""Rate limits: bucket arithmetic, the authoritative table, and leased limiters sharing one state (two
ingress processes), checked against the stated lease slack."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime

import pytest

from deployments.gateway.keys import Grant, Limits, Quota
from deployments.gateway.limits_state import Ask, LimitTable, LocalState, Spec
from deployments.gateway.ratelimit import LeaseLimiter, estimate, go_duration
from deployments.gateway.token_bucket import Bucket, Window, period_end
from deployments.messages import ServeError

COMPLETION = "/v1/completions"


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_bucket_refills_at_its_rate_and_carries_debt():
    b = Bucket.full(10, 2.0, now=0.0)
    assert b.take(10, 0.0) and not b.take(1, 0.0)
    assert b.wait(4, 0.0) == 2.0 and b.take(4, 2.0)
    b.put(-6, 2.0)  # used beyond its reservation: a debt
    assert b.level == -6 and b.wait(1, 2.0) == 3.5
    assert b.wait(11, 2.0) == math.inf  # more than the capacity: never
    b.put(100, 100.0)
    assert b.level == 10  # capped
    assert b.take_up_to(25, 100.0) == 10 and b.level == 0
    b.resize(20, 2.0, 100.0)  # a raised limit keeps what was used
    assert b.level == 10 and b.reset_s(100.0) == 5.0


def test_quota_windows_follow_the_calendar():
    assert period_end("hour", ts("2026-12-31T23:10:00")) == ts("2027-01-01T00:00:00")
    assert period_end("day", ts("2026-12-31T23:10:00")) == ts("2027-01-01T00:00:00")
    assert period_end("month", ts("2026-12-31T23:10:00")) == ts("2027-01-01T00:00:00")
    assert period_end("month", ts("2027-01-31T00:00:00")) == ts("2027-02-01T00:00:00")
    assert period_end("week", ts("2026-12-02T10:00:00")) == ts("2026-12-07T00:00:00")  # a Wednesday -> Monday
    w = Window.full(100, "day", ts("2026-12-02T10:00:00"))
    assert w.take(100, ts("2026-12-02T11:00:00")) and not w.take(1, ts("2026-12-02T23:59:59"))
    w.put(-30, ts("2026-12-02T23:59:59"))  # 30 over: the next day starts 30 short
    assert w.wait(1, ts("2026-12-02T23:59:59")) == 1.0
    assert w.take(70, ts("2026-12-03T00:00:00")) and not w.take(1, ts("2026-12-03T00:00:01"))


def test_table_grants_all_needs_or_nothing_then_leases():
    t = LimitTable()
    req, tok = Spec("bucket", 10, 10 / 60), Spec("bucket", 100, 100 / 60)
    asks = [Ask(("k", "*", "requests"), req, 1, 3), Ask(("k", "*", "tokens"), tok, 90, 95)]
    assert t.grant(asks, now=0.0).granted == (3.0, 95.0)
    refused = t.grant(asks, now=0.0)  # tokens short: the requests bucket must not lose anything
    assert refused.granted is None and refused.refused == 1 and refused.retry_after_s == pytest.approx(85 * 0.6)
    assert t.buckets[("k", "*", "requests")].level == 7
    t.settle([(("k", "*", "tokens"), tok, 50)], now=0.0)
    assert t.buckets[("k", "*", "tokens")].level == 55
    w = Spec("window", 1000, period="month")
    t.grant([Ask(("k", "*", "quota"), w, 400, 400)], now=ts("2026-12-02T00:00:00"))
    restored = LimitTable()
    restored.restore(t.usage())
    assert restored.buckets[("k", "*", "quota")].level == 600


def grant(**kw) -> Grant:
    quota = kw.pop("quota", None)
    return Grant("k", ("*",), Limits(**kw), quota=quota)


async def burst(limiters: list[LeaseLimiter], g: Grant, n: int, body: dict | None = None,
                used: int | None = None) -> tuple[int, list[ServeError]]:
    """n requests spread over the limiters; each settles at once having used ``used`` tokens (None: its
    reservation). Returns (admitted, refusals)."""
    admitted, refusals = 0, []
    body = body or {"model": "m", "prompt": "hi", "max_tokens": 8}
    for i in range(n):
        lim = limiters[i % len(limiters)]
        try:
            res = await lim.reserve(g, COMPLETION, body)
        except ServeError as err:
            refusals.append(err)
            continue
        admitted += 1
        lim.settle(res, res.tokens if used is None else used)
    return admitted, refusals


def test_two_ingress_processes_never_admit_more_than_the_limit_and_rarely_ask():
    state = LocalState()
    routers = [LeaseLimiter(state, lease_fraction=0.05), LeaseLimiter(state, lease_fraction=0.05)]
    g = grant(rpm=60)

    async def go():
        start = time.time()
        admitted, refusals = await burst(routers, g, 300)
        return admitted, refusals, time.time() - start

    admitted, refusals, elapsed = asyncio.run(go())
    lease = 3  # 5% of 60
    assert admitted <= 60 + 60 / 60 * elapsed + 1e-9  # no over-admission, whatever the number of processes
    assert admitted >= 60 - lease  # under-admission: at most (R - 1) leases held back
    assert all(e.info.status == 429 and e.info.code == "rate_limit_exceeded" and e.info.type == "requests"
               for e in refusals)
    # one round trip per lease, not per request; refusals are remembered until their retry time
    assert state.calls < 60 / 2 + 10, state.calls
    head = dict(refusals[0].info.headers())
    assert head["x-ratelimit-limit-requests"] == "60" and int(head["x-ratelimit-remaining-requests"]) <= lease
    assert int(head["retry-after-ms"]) > 0 and int(head["Retry-After"]) >= 1


def test_tokens_are_reserved_then_the_unused_part_refunded():
    state = LocalState()
    lim = LeaseLimiter(state, lease_fraction=0.05)
    g = grant(tpm=1000)
    body = {"model": "m", "prompt": "x" * 38, "max_tokens": 60}  # reserves 40 + 60 = 100
    assert estimate(COMPLETION, body) == 100
    no_refund, _ = asyncio.run(burst([lim], g, 30, body))
    assert no_refund == 10  # 1000 / 100, using all it reserved

    state2 = LocalState()
    lim2 = LeaseLimiter(state2, lease_fraction=0.05)
    refunded, _ = asyncio.run(burst([lim2], g, 30, body, used=25))  # each really used 25
    assert refunded == 30  # the 75 unused of each went back at once


def test_a_refusal_is_remembered_without_a_round_trip_until_its_retry_time():
    state = LocalState()
    lim = LeaseLimiter(state)
    g = grant(rpm=2)

    async def go():
        await burst([lim], g, 2)
        calls = state.calls
        a, refusals = await burst([lim], g, 50)
        return calls, state.calls, a, refusals

    before, after, admitted, refusals = asyncio.run(go())
    assert admitted == 0 and len(refusals) == 50 and after - before == 1
    assert all(float(e.info.headers()["retry-after-ms"]) > 0 for e in refusals)


def test_quota_spent_is_insufficient_quota_and_too_large_is_refused_outright():
    lim = LeaseLimiter(LocalState())
    g = grant(quota=Quota(250, "day"))
    admitted, refusals = asyncio.run(burst([lim], g, 5, {"model": "m", "prompt": [1] * 90, "max_tokens": 10}))
    assert admitted == 2
    assert refusals[0].info.status == 429 and refusals[0].info.code == "insufficient_quota"
    assert refusals[0].info.type == "insufficient_quota"
    big = grant(tpm=100)
    _, too_large = asyncio.run(burst([LeaseLimiter(LocalState())], big, 1, {"model": "m", "prompt": "x",
                                                                            "max_tokens": 500}))
    err = too_large[0]
    assert err.info.status == 429 and "Request too large" in err.info.message
    assert "Retry-After" not in err.info.headers()


def test_per_model_limits_apply_on_top_of_the_key():
    g = Grant("k", ("*",), Limits(rpm=100), (("small-*", Limits(rpm=2)),))
    lim = LeaseLimiter(LocalState())
    small, _ = asyncio.run(burst([lim], g, 5, {"model": "small-1", "prompt": "x"}))
    other, _ = asyncio.run(burst([lim], g, 5, {"model": "big", "prompt": "x"}))
    assert (small, other) == (2, 5)


def test_headers_follow_openai_and_idle_leases_go_back():
    state = LocalState()
    lim = LeaseLimiter(state, lease_fraction=0.1, lease_ttl_s=0.0)
    g = grant(rpm=100, tpm=10_000)

    async def go():
        res = await lim.reserve(g, COMPLETION, {"model": "m", "prompt": "hi", "max_tokens": 10})
        lim.settle(res, 5)
        head = dict(res.headers)
        await lim.sweep()
        return head

    head = asyncio.run(go())
    assert head["x-ratelimit-limit-requests"] == "100" and head["x-ratelimit-limit-tokens"] == "10000"
    assert int(head["x-ratelimit-remaining-requests"]) == 99
    assert head["x-ratelimit-reset-requests"] in ("600ms", "1s")
    level = state.table.buckets[("k", "*", "tokens")].level
    assert level == pytest.approx(10_000 - 5, abs=1)  # the lease and the refund are back: only 5 used
    assert [go_duration(x) for x in (0.02, 1, 59.2, 360, 3723)] == ["20ms", "1s", "1m0s", "6m0s", "1h2m3s"]


def test_an_unreachable_state_degrades_to_per_process_limits():
    class Down:
        async def grant(self, asks):
            raise ConnectionError("gone")

        async def settle(self, deltas):
            raise ConnectionError("gone")

    lim = LeaseLimiter(Down())
    admitted, refusals = asyncio.run(burst([lim], grant(rpm=5), 20))
    assert admitted == 5 and len(refusals) == 15


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": {"a": [1, "b", None, True, 2.5]}}, {"model": 3, "prompt": None, "max_tokens": "x"},
    {"messages": "hi", "max_tokens": -1, "n": 10**9}, {"messages": [{"role": "user", "content": [{"text": "é"}]}]},
])
def test_estimate_survives_any_body(body):
    for route in (COMPLETION, "/v1/chat/completions", "/v1/embeddings"):
        assert estimate(route, body, 64) >= 1


def test_estimate_is_an_upper_bound_of_prompt_bytes_plus_output():
    assert estimate(COMPLETION, {"prompt": "héllo"}) == 6 + 2 + 16
    assert estimate(COMPLETION, {"prompt": [1, 2, 3], "max_tokens": 4}) == 3 + 2 + 4
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5}
    assert estimate("/v1/chat/completions", chat) == len("user") + 2 + 8 + 5
    assert estimate("/v1/chat/completions", {"messages": []}, 1024) == 1024
