"""Admission at a model replica: refuse at once what would wait too long, so rejection is early and the
wait of admitted requests is bounded. Pure (no Ray), unit-tested alone.

A replica has ``slots`` sequences that run at once (the engine's max_num_seqs). A request that arrives
with ``queued`` requests not yet started ahead of it and ``running`` slots busy starts after
k = queued + running + 1 - slots slots free up; slots free at about slots / T per second, T being the
recent mean time a request holds a slot, so its expected wait is max(0, k) * T / slots (Little's law on
each slot). It is refused when that exceeds ``max_queue_wait_s``, when ``queued`` has reached
``max_waiting``, or when the wait would outlast the request's own deadline.

Example:
    >>> tracker = LoadTracker(slots=2)
    >>> decide(tracker.snapshot(), AdmissionLimits(max_waiting=4, max_queue_wait_s=5.0)).admit
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionLimits:
    """Config: ``admission`` of a model. ``max_waiting``: requests admitted but not started, per replica."""

    max_waiting: int = 32
    max_queue_wait_s: float = 3.0


@dataclass(frozen=True)
class Load:
    slots: int
    running: int  # admitted requests that have started (produced output or are being prefilled)
    queued: int  # admitted, not started
    mean_service_s: float | None  # recent mean time a request holds a slot; None before any finished


@dataclass(frozen=True)
class Decision:
    admit: bool
    expected_wait_s: float
    reason: str = ""
    retry_after_s: float = 1.0


def expected_wait(load: Load) -> float:
    ahead = load.queued + load.running + 1 - load.slots
    if ahead <= 0 or not load.mean_service_s:
        return 0.0
    return ahead * load.mean_service_s / load.slots


def decide(load: Load, limits: AdmissionLimits, time_left_s: float | None = None) -> Decision:
    wait = expected_wait(load)
    retry = max(1.0, min(30.0, math.ceil(wait / 2) if wait else 1.0))
    if load.queued >= limits.max_waiting:
        return Decision(False, wait, f"{load.queued} requests already wait on this replica "
                        f"(admission.max_waiting {limits.max_waiting})", retry)
    if wait > limits.max_queue_wait_s:
        return Decision(False, wait, f"expected wait {wait:.1f} s exceeds admission.max_queue_wait_s "
                        f"{limits.max_queue_wait_s:g}", retry)
    if time_left_s is not None and wait > time_left_s:
        return Decision(False, wait, f"expected wait {wait:.1f} s exceeds the request's deadline", retry)
    return Decision(True, wait)


class LoadTracker:
    """The replica's own counts, updated on the request path (O(1)), and an exponentially weighted mean of
    how long finished requests held a slot (alpha 0.2: about the last ten)."""

    def __init__(self, slots: int, alpha: float = 0.2) -> None:
        self.slots, self.alpha = slots, alpha
        self.queued = 0
        self.running = 0
        self.mean_service_s: float | None = None

    def snapshot(self) -> Load:
        return Load(self.slots, self.running, self.queued, self.mean_service_s)

    def enqueue(self) -> None:
        self.queued += 1

    def start(self) -> None:
        self.queued -= 1
        self.running += 1

    def finish(self, started: bool, service_s: float | None) -> None:
        if started:
            self.running -= 1
        else:
            self.queued -= 1
        if started and service_s is not None:
            m = self.mean_service_s
            self.mean_service_s = service_s if m is None else (1 - self.alpha) * m + self.alpha * service_s
