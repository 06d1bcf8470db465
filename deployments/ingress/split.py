"""Weighted, sticky traffic splits: which version of a model answers one request (canary, A/B).

Weighted rendezvous hashing (Schindelhauer & Schomaker, "Weighted Distributed Hash Tables", SPAA 2005; the
logarithmic form of HRW): for a caller key ``k`` every target ``i`` with weight ``w_i`` scores
``s_i = -w_i / ln(h(k, i))`` with ``h`` uniform in (0, 1), and the highest score wins. Then

- ``P(target i) = w_i / sum(w)`` over callers (the split holds in expectation, within binomial bounds);
- one caller always lands on the same target while the weights stay (sticky: one user sees one version);
- changing one weight moves only the callers that must move (those won or lost by that target), so a canary
  stepped from 10% to 25% keeps its first 10% of users.

A request without a key (no ``user`` field, no session header) is split by weight at random. A weight of 0
takes no traffic (a drained version).

Example:
    >>> from deployments.ingress.resolve import Target
    >>> ts = (Target("v1", 90.0), Target("v2", 10.0))
    >>> choose(ts, "alice") == choose(ts, "alice")
    True
    >>> sum(choose(ts, f"user-{i}").deployment == "v2" for i in range(1000))  # ~10%
    99
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Protocol


class Target(Protocol):  # resolve.Target (no import: resolve uses this module)
    weight: float

    @property
    def key(self) -> str: ...


def _unit(key: str, name: str) -> float:
    """A uniform number in (0, 1) from (key, target), stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{key}\x00{name}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2**64


def choose(targets: Sequence[Target], key: str | None = None, rng: random.Random | None = None) -> Target:
    """The target for one request (``key``: the caller's stickiness key, or None)."""
    live = [t for t in targets if t.weight > 0]
    if not live:
        raise ValueError("no target has a positive weight")
    if len(live) == 1:
        return live[0]
    if key is None:
        return (rng or random).choices(live, weights=[t.weight for t in live])[0]
    return max(live, key=lambda t: -t.weight / math.log(_unit(key, t.key)))
