"""Load shedding at the ingress: while a model is known to be full, refuse at once, before the handle call.

A replica's admission (deployments/admission.py) is the authority on whether it can take a request, but
asking it costs a Serve routing decision, an actor call and a turn of the replica's event loop: under
overload that round trip is where the time to a 503 goes. So the ingress remembers the answer.

Invariant: a model's gate is shut only after one of its replicas refused a request for overload, for at
most that refusal's Retry-After, and only while this router has at least as many of the model's requests
in flight as when it was refused (``level``). Every request that ends lowers the count below the level and
lets the next one through to the replica, which re-arms the gate if it refuses again: the gate admits as
many requests as finish, and the replica still decides each one. With several replicas the level is the
model's total, so a refusal by one full replica may shed while another has room, until the first request
ends (at most one Retry-After): a bounded, conservative error, the price of no round trip.

Example:
    >>> s = Shedder(clock=lambda: 0.0)
    >>> t = s.enter("m"); s.leave(t, refused_for_s=2.0)  # the replica said: overloaded, retry in 2 s
    >>> s.check("m") is None  # nothing in flight any more: the next request may try
    True
    >>> busy = s.enter("m"); t = s.enter("m"); s.leave(t, refused_for_s=2.0)
    >>> s.check("m")  # one still in flight, as when refused: shed, retry after the replica's 2 s
    2.0
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Ticket:
    """One request in flight to one model deployment (handed back to ``leave``)."""

    target: str


@dataclass(frozen=True)
class _Gate:
    level: int  # requests in flight at the refusal (the refused one not counted)
    until: float  # the refusal's Retry-After, on the shedder's clock
    retry_after_s: float


class Shedder:
    """Per model deployment: requests in flight through this router, and the gate a refusal shuts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self._gates: dict[str, _Gate] = {}
        self.shed = 0  # requests refused here without asking a replica (for metrics and tests)

    def check(self, target: str) -> float | None:
        """None when a request to ``target`` may go on; else the Retry-After (seconds) to answer with."""
        gate = self._gates.get(target)
        if gate is None:
            return None
        if self.clock() >= gate.until:
            del self._gates[target]
            return None
        if self.in_flight.get(target, 0) < gate.level or gate.level == 0:
            return None
        self.shed += 1
        return gate.retry_after_s

    def enter(self, target: str) -> Ticket:
        self.in_flight[target] = self.in_flight.get(target, 0) + 1
        return Ticket(target)

    def leave(self, ticket: Ticket, refused_for_s: float | None = None) -> None:
        """The request ended; ``refused_for_s``: a replica refused it for overload with this Retry-After."""
        target = ticket.target
        self.in_flight[target] = n = self.in_flight[target] - 1
        if refused_for_s is not None:
            self._gates[target] = _Gate(n, self.clock() + refused_for_s, refused_for_s)
