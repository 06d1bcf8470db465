"""The ingress's load shedding: shut only by a refusal, only while as busy as then, never past Retry-After."""

from __future__ import annotations

from deployments.ingress.shed import Shedder


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_open_until_a_replica_refuses():
    s = Shedder(clock=Clock())
    tickets = [s.enter("m") for _ in range(50)]
    assert s.check("m") is None and s.in_flight == {"m": 50}
    for t in tickets:
        s.leave(t)
    assert s.in_flight == {"m": 0} and s.shed == 0


def test_shut_while_as_busy_as_at_the_refusal_and_one_through_per_finish():
    clock = Clock()
    s = Shedder(clock=clock)
    running = [s.enter("m") for _ in range(3)]
    s.leave(s.enter("m"), refused_for_s=2.0)  # the 4th was refused: 3 in flight at that moment
    assert s.check("m") == 2.0 and s.check("m") == 2.0 and s.shed == 2
    s.leave(running.pop())  # one finished: the next request is let through to ask the replica
    assert s.check("m") is None
    probe = s.enter("m")  # ... and admitted: as busy as at the refusal again, so shut
    assert s.check("m") == 2.0
    s.leave(probe)
    assert s.check("m") is None


def test_a_refusal_shuts_for_its_retry_after_only():
    clock = Clock()
    s = Shedder(clock=clock)
    _busy = s.enter("m")
    s.leave(s.enter("m"), refused_for_s=1.5)
    assert s.check("m") == 1.5
    clock.t += 1.49
    assert s.check("m") == 1.5
    clock.t += 0.02
    assert s.check("m") is None and s.check("m") is None  # expired: open until the next refusal


def test_nothing_in_flight_never_sheds():
    s = Shedder(clock=Clock())
    s.leave(s.enter("m"), refused_for_s=5.0)  # refused with nothing else in flight (e.g. another router's load)
    assert s.check("m") is None


def test_models_are_gated_apart():
    s = Shedder(clock=Clock())
    _busy = s.enter("a")
    s.leave(s.enter("a"), refused_for_s=3.0)
    assert s.check("a") == 3.0 and s.check("b") is None
