"""Rate limits in an ingress process: local leases of the cluster's buckets (``limits_state.py``).

Per key (and per model glob when the key says so): requests per minute, tokens per minute, a token quota.
A request reserves at admission 1 request and ``estimate`` tokens (its prompt, over-estimated, plus its
``max_tokens``), from the leases this process holds; when they fall short it asks the state for the need
plus a lease (``lease_fraction`` of the limit) in one round trip. When the request ends, ``settle`` charges
what it really used (prompt + completion tokens, streamed or not, also when the client left early): the
unused part of the reservation goes back to the lease at once. An idle lease returns to the state after
``lease_ttl_s``. A refused bucket is remembered until its retry time, so a flood of refused requests costs
no round trips either.

The lease slack (what a test may observe against a limit ``m`` per minute, with ``R`` ingress processes):
- over-admission: none. Every admitted unit was deducted from the one state first; over a burst of length
  ``T`` the admitted total is at most ``m + m*T/60`` (the token bucket's own bound), for any ``R``.
- under-admission: up to ``(R - 1) * lease`` units can sit unused in other processes' leases, for at most
  ``lease_ttl_s``; ``lease = max(1, lease_fraction * m)`` (5%: 3 requests of 60 rpm).
- tokens: a request uses at most what it reserved when the prompt estimate is an upper bound (UTF-8 bytes:
  every BPE or byte-fallback token covers at least one byte); if it is not (a chat template that adds many
  tokens), the excess is charged at settlement and may put the bucket briefly into debt.
The ``x-ratelimit-remaining-*`` headers are this process's view: the state's level at its last reply,
refilled since, plus its own lease.

If the state cannot be reached, each process enforces the limits alone (a process-local table), so a key
gets at most ``R`` times its limit until the state is back: degraded, counted in
``modelfleet_rate_limit_leases_total{result="error"}``, never an outage.

Example:
    >>> import asyncio
    >>> from deployments.gateway.keys import Grant, Limits
    >>> lim = LeaseLimiter(LocalState())
    >>> g = Grant("k", ("*",), Limits(rpm=2))
    >>> async def three():
    ...     out = []
    ...     for _ in range(3):
    ...         try:
    ...             out.append((await lim.reserve(g, "/v1/completions", {"model": "m", "prompt": "hi"})).key_id)
    ...         except ServeError as err:
    ...             out.append(err.info.code)
    ...     return out
    >>> asyncio.run(three())
    ['k', 'k', 'rate_limit_exceeded']
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deployments import metrics
from deployments.gateway.keys import Grant, Limits
from deployments.gateway.limits_state import Ask, BucketKey, LimitTable, LocalState, Reply, Spec
from deployments.messages import ErrorInfo, ServeError

logger = logging.getLogger("ray.serve")

CHAT_TURN_TOKENS = 8  # what a chat template adds per message, at most, for the templates we ship
DEFAULT_CONTEXT = 4096  # reserved as the output of a chat request without max_tokens, when the model's is unknown


def _text_units(value: Any) -> int:
    """UTF-8 bytes of every string, 1 per integer (token ids), anywhere in ``value`` (bounded by the body)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int | float):
        return 1
    if isinstance(value, list):
        return sum(_text_units(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_units(v) for k, v in value.items() if k != "name")
    return 0


def estimate(route: str, body: Mapping[str, Any], context_len: int | None = None) -> int:
    """Tokens to reserve for a request (before it is tokenized): prompt upper bound + the most it may
    generate (``max_tokens``; OpenAI's 16 for completions; the model's context for chat without it)."""
    if route == "/v1/embeddings":
        return max(1, _text_units(body.get("input")))
    if route == "/v1/chat/completions":
        messages = body.get("messages")
        prompt = _text_units(messages) + CHAT_TURN_TOKENS * (len(messages) if isinstance(messages, list) else 1)
        out = body.get("max_completion_tokens") or body.get("max_tokens")
        default = context_len or DEFAULT_CONTEXT
    else:
        prompt = _text_units(body.get("prompt")) + 2  # BOS/EOS the tokenizer may add
        out, default = body.get("max_tokens"), 16
    out = out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else default
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
    return prompt + min(out, 1 << 31) * n


@dataclass
class _Lease:
    """This process's share of one bucket."""

    have: float = 0.0
    used_at: float = 0.0
    level: float | None = None  # the state's level at its last reply (after leases)
    seen_at: float = 0.0
    blocked_until: float = 0.0
    blocked_spec: Spec | None = None  # the limit it was refused under (a changed limit lifts the block)


@dataclass(frozen=True)
class Reservation:
    key_id: str
    tokens: int  # reserved tokens (settled against what the request really used)
    buckets: tuple[tuple[BucketKey, Spec, str], ...]  # (bucket, spec, what it counts: requests|tokens)
    headers: tuple[tuple[str, str], ...] = ()


def go_duration(seconds: float) -> str:
    """OpenAI's reset format (Go's time.Duration): ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m}m{sec}s" if h else f"{m}m{sec}s" if m else f"{sec}s"


class LeaseLimiter:
    """The ingress's rate-limit stage (``Pipeline``'s RateLimiter): ``admit`` before a request runs,
    ``settle`` when it ends."""

    def __init__(self, state: Any, lease_fraction: float = 0.05, lease_ttl_s: float = 2.0,
                 context_len: Callable[[str], int | None] = lambda model: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state, self.lease_fraction, self.lease_ttl_s = state, lease_fraction, lease_ttl_s
        self.context_len, self.clock = context_len, clock
        self.leases: dict[BucketKey, _Lease] = {}
        self.specs: dict[BucketKey, Spec] = {}  # each bucket's latest spec, for returning its lease
        self.fallback = LimitTable()  # used only while the state is unreachable
        self._locks: dict[str, asyncio.Lock] = {}
        self._sweeper: asyncio.Task | None = None
        self._error_logged = 0.0

    # ---- the stage ------------------------------------------------------------------------------------
    async def admit(self, a: Any) -> Reservation | None:
        """Reserve for an admitted request (``a``: stages.Admitted); None when its key has no limits."""
        if not isinstance(a.principal, Grant) or not a.principal.limited:
            return None
        return await self.reserve(a.principal, a.route, a.body or {})

    def plan(self, g: Grant, model: str) -> list[tuple[BucketKey, Spec, str]]:
        out: list[tuple[BucketKey, Spec, str]] = []

        def add(scope: str, lim: Limits) -> None:
            if lim.rpm:
                out.append(((g.key_id, scope, "requests"), Spec("bucket", lim.rpm, lim.rpm / 60), "requests"))
            if lim.tpm:
                out.append(((g.key_id, scope, "tokens"), Spec("bucket", lim.tpm, lim.tpm / 60), "tokens"))

        add("*", g.limits)
        scope = g.model_scope(model)
        if scope is not None:
            add(*scope)
        if g.quota is not None:
            out.append(((g.key_id, "*", "quota"), Spec("window", g.quota.tokens, period=g.quota.period), "tokens"))
        for key, spec, _ in out:
            self.specs[key] = spec
        return out

    async def reserve(self, g: Grant, route: str, body: Mapping[str, Any]) -> Reservation:
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        tokens = estimate(route, body, self.context_len(model) if model else None)
        buckets = self.plan(g, model)
        needs = [1.0 if what == "requests" else float(tokens) for _, _, what in buckets]
        for i, ((_, spec, _), need) in enumerate(zip(buckets, needs, strict=True)):
            if need > spec.capacity:  # could never be admitted: refused outright, no round trip, no block
                raise self._refusal(g, buckets, needs, i, math.inf)
        self._start_sweeper()
        for _ in range(3):  # a concurrent request of the same key may take what a round trip brought
            if self._take_local(buckets, needs):
                break
            async with self._locks.setdefault(g.key_id, asyncio.Lock()):
                if self._take_local(buckets, needs):
                    break
                await self._refill(g, buckets, needs)
        else:
            raise self._refusal(g, buckets, needs, 0, 1.0)
        return Reservation(g.key_id, tokens, tuple(buckets), tuple(self.headers(buckets).items()))

    def settle(self, res: Reservation | None, used_tokens: int) -> None:
        """The request ended having used ``used_tokens``: the rest of its reservation returns to the lease
        (or the excess is charged to it)."""
        if res is None:
            return
        delta, now = res.tokens - max(0, used_tokens), self.clock()
        for key, _, what in res.buckets:
            if what == "tokens" and delta:
                lease = self.leases.setdefault(key, _Lease())
                lease.have += delta
                lease.used_at = now

    # ---- leases ---------------------------------------------------------------------------------------
    def _take_local(self, buckets: list, needs: list[float]) -> bool:
        leases = [self.leases.setdefault(key, _Lease()) for key, _, _ in buckets]
        if any(lease.have < need for lease, need in zip(leases, needs, strict=True)):
            return False
        now = self.clock()
        for lease, need in zip(leases, needs, strict=True):
            lease.have -= need
            lease.used_at = now
        return True

    def lease_size(self, spec: Spec) -> float:
        return max(1.0, math.floor(spec.capacity * self.lease_fraction))

    async def _refill(self, g: Grant, buckets: list, needs: list[float]) -> None:
        now = self.clock()
        leases = [self.leases[key] for key, _, _ in buckets]
        short = [i for i, (lease, need) in enumerate(zip(leases, needs, strict=True)) if lease.have < need]
        blocked = [i for i in short if leases[i].blocked_until > now and leases[i].blocked_spec == buckets[i][1]]
        if blocked:  # refused a moment ago: refuse again without asking
            i = blocked[0]
            raise self._refusal(g, buckets, needs, i, leases[i].blocked_until - now)
        asks = []
        for (key, spec, _), lease, need in zip(buckets, leases, needs, strict=True):
            missing = max(0.0, need - lease.have)
            top_up = self.lease_size(spec) if lease.have - need < self.lease_size(spec) / 2 else 0.0
            asks.append(Ask(key, spec, missing, missing + top_up))
        reply = await self._ask(asks)
        now = self.clock()
        for lease, level in zip(leases, reply.levels, strict=True):
            lease.level, lease.seen_at = level, now
        if reply.granted is None:
            i = reply.refused
            if math.isfinite(reply.retry_after_s):
                leases[i].blocked_until, leases[i].blocked_spec = now + reply.retry_after_s, buckets[i][1]
            raise self._refusal(g, buckets, needs, i, reply.retry_after_s)
        for lease, got in zip(leases, reply.granted, strict=True):
            lease.have += got
            lease.used_at = now

    async def _ask(self, asks: list[Ask]) -> Reply:
        try:
            reply = await self.state.grant(asks)
            metrics.RATE_LIMIT_LEASES.labels("granted" if reply.granted is not None else "refused").inc()
            return reply
        except Exception as err:  # the state is unreachable: this process enforces the limits alone
            metrics.RATE_LIMIT_LEASES.labels("error").inc()
            if time.monotonic() - self._error_logged > 10:
                self._error_logged = time.monotonic()
                logger.warning("rate-limit state unreachable (%s): limits enforced per process", type(err).__name__)
            return self.fallback.grant([Ask(a.bucket, a.spec, a.need, a.need) for a in asks])

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_s / 2)
            try:
                await self.sweep()
            except Exception as err:  # the state is away: the leases stay here until it is back
                logger.debug("returning rate-limit leases failed: %s", err)

    async def sweep(self, everything: bool = False) -> None:
        """Give idle leases (and debts) back to the state."""
        now = self.clock()
        back = [(key, lease) for key, lease in self.leases.items()
                if lease.have and (everything or now - lease.used_at > self.lease_ttl_s)]
        if not back:
            return
        deltas = [(key, self.specs[key], lease.have) for key, lease in back if key in self.specs]
        for _, lease in back:
            lease.have = 0.0
        if deltas:
            await self.state.settle(deltas)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.sweep(everything=True)

    # ---- what the client sees ---------------------------------------------------------------------------
    def headers(self, buckets: list[tuple[BucketKey, Spec, str]]) -> dict[str, str]:
        """OpenAI's x-ratelimit-* for the key-wide (else the model's) requests and tokens buckets."""
        out: dict[str, str] = {}
        now = self.clock()
        for key, spec, _ in buckets:
            kind = key[2]
            if kind == "quota" or f"x-ratelimit-limit-{kind}" in out:
                continue
            lease = self.leases.get(key, _Lease())
            level = spec.capacity if lease.level is None else lease.level
            remaining = max(0.0, min(spec.capacity, min(spec.capacity, level + (now - lease.seen_at) * spec.rate)
                                     + lease.have))
            out[f"x-ratelimit-limit-{kind}"] = str(int(spec.capacity))
            out[f"x-ratelimit-remaining-{kind}"] = str(int(remaining))
            out[f"x-ratelimit-reset-{kind}"] = go_duration((spec.capacity - remaining) / spec.rate)
        return out

    def _refusal(self, g: Grant, buckets: list, needs: list[float], i: int, wait_s: float) -> ServeError:
        key, spec, _ = buckets[i]
        headers = tuple(self.headers(buckets).items())
        what = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)",
                "quota": f"tokens per {spec.period} (quota)"}[key[2]]
        scope = "" if key[1] == "*" else f" for models {key[1]!r}"
        head = f"on {what}{scope} of key {g.key_id!r}: Limit {int(spec.capacity)}, Requested {int(needs[i])}."
        if needs[i] > spec.capacity:
            return ServeError(ErrorInfo(429, f"Request too large {head} Lower max_tokens or the prompt.",
                                        type="tokens", code="rate_limit_exceeded", extra_headers=headers))
        if key[2] == "quota":
            return ServeError(ErrorInfo(429, f"You exceeded your quota {head} It renews in {go_duration(wait_s)}.",
                                        type="insufficient_quota", code="insufficient_quota",
                                        extra_headers=headers))
        return ServeError(ErrorInfo(429, f"Rate limit reached {head} Please try again in {go_duration(wait_s)}.",
                                    type=key[2], code="rate_limit_exceeded", retry_after_s=max(wait_s, 0.001),
                                    extra_headers=headers))


__all__ = ["LeaseLimiter", "LocalState", "Reservation", "estimate", "go_duration"]
