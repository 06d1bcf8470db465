"""The router's live version table: weights, readiness gating (blue/green), stickiness keys, analysis overrides."""

from __future__ import annotations

import asyncio
import doctest

import pytest

from deployments.ingress import traffic as traffic_module
from deployments.ingress.resolve import ModelRoute, Target
from deployments.ingress.traffic import Traffic
from deployments.ingress.versions import VersionTable
from deployments.messages import ServeError


def table(**models) -> VersionTable:
    return VersionTable.model_validate({"models": models})


def make(*ready: str, **models) -> Traffic:
    t = Traffic([ModelRoute("own", "llm", (Target("own"),))], {"own": "own-handle"}, connect=lambda d, a: (a, d))
    t.apply(table(**models))
    for app in ready:
        t.mark_ready(f"{app}/tiny", {"ready": True, "version": app.upper()})
    return t


def share(t: Traffic, app: str, n: int = 400) -> int:
    return sum(t.choose("tiny", "llm", key=f"user-{i}").app == app for i in range(n))


def test_doctests():
    assert doctest.testmod(traffic_module).failed == 0


def test_ready_versions_split_by_weight_sticky_per_caller():
    t = make("v1", "v2", tiny={"versions": {"v1": 75, "v2": 25}})
    hits = share(t, "v2")
    assert abs(hits - 100) <= 4 * (400 * 0.25 * 0.75) ** 0.5  # within 4 sigma of the binomial
    assert {t.choose("tiny", "llm", key="alice").app for _ in range(20)} == {t.choose("tiny", "llm", key="alice").app}
    assert t.handles["v2/tiny"] == ("v2", "tiny")  # a handle per (application, deployment)


def test_a_canary_that_is_not_ready_takes_no_traffic_until_it_is():
    t = make("v1", tiny={"versions": {"v1": 90, "v2": 10}})
    assert share(t, "v2") == 0
    t.mark_ready("v2/tiny", {"ready": True})
    assert share(t, "v2") > 0
    t.mark_ready("v2/tiny", None)  # its probe failed: out again
    assert share(t, "v2") == 0


def test_blue_green_the_old_version_answers_until_the_new_one_is_ready():
    t = make("v1", tiny={"versions": {"v1": 100}})
    assert t.choose("tiny", "llm").app == "v1"  # routed to v1: the model's last targets
    t.apply(table(tiny={"versions": {"v2": 100, "v1": 0}}))  # the move: v2 gets the weight, v1 is drained
    assert {t.choose("tiny", "llm", key=f"u{i}").app for i in range(50)} == {"v1"}  # v2 still loading
    t.mark_ready("v2/tiny", {"ready": True})
    assert {t.choose("tiny", "llm", key=f"u{i}").app for i in range(50)} == {"v2"}
    t.mark_ready("v2/tiny", None)  # and the previous targets are now v2's: no flapping back to v1
    assert t.choose("tiny", "llm").app == "v2"


def test_with_nothing_ready_the_weighted_targets_are_tried():
    t = make(tiny={"versions": {"v1": 1, "v2": 0}})
    assert t.choose("tiny", "llm").app == "v1"  # the call then waits for a replica (cold start), bounded


def test_the_router_own_models_and_errors_are_unchanged():
    t = make("v1", tiny={"versions": {"v1": 1}})
    assert t.choose("own", "llm").key == "own"
    with pytest.raises(ServeError, match="not found"):
        t.choose("nope", "llm")
    with pytest.raises(ServeError, match="does not serve embedding"):
        t.choose("tiny", "embedding")
    with pytest.raises(ValueError, match="both the router's own and versioned"):
        t.apply(table(own={"versions": {"x": 1}}))


def test_stickiness_key_is_the_user_else_the_session_header():
    t = make("v1", tiny={"versions": {"v1": 1}, "session_header": "x-conversation"})
    assert t.caller("tiny", "bob", {"x-conversation": "c1"}) == "bob"
    assert t.caller("tiny", None, {"x-conversation": "c1"}) == "c1"
    assert t.caller("own", None, {"x-session-id": "c1"}) is None  # the router's own models: by user only


def test_analysis_overrides_hold_while_the_spec_does_and_reset_when_it_changes():
    spec = {"versions": {"v1": 90, "v2": 10}, "analysis": {"canary": "v2", "steps": [10, 50, 100]}}
    t = make("v1", "v2", tiny=spec)
    t.override("tiny", {"v1": 50.0, "v2": 50.0})
    assert t.weights("tiny") == {"v1": 50.0, "v2": 50.0}
    t.apply(table(tiny=spec))  # the same config deployed again: the decided weights stay
    assert t.weights("tiny") == {"v1": 50.0, "v2": 50.0}
    t.apply(table(tiny={**spec, "analysis": {"canary": "v2", "steps": [25, 100]}}))
    assert t.weights("tiny") == {"v1": 90.0, "v2": 10.0}


def test_listing_shows_the_model_once_with_its_versions():
    t = make("v1", "v2", tiny={"versions": {"v1": 90, "v2": 10}, "shadow": {"app": "v3"}})
    listing = t.listing("tiny")
    assert listing["version"] == "V1" and [v["version"] for v in listing["versions"]] == ["V1", "V2"]
    assert [v["role"] for v in t.describe("tiny")] == ["live", "live", "shadow"]
    assert t.listing("own") == {}


def test_probe_marks_failures_and_timeouts_not_ready():
    class Info:
        def __init__(self, answer):
            self.answer = answer

        async def remote(self):
            if self.answer == "hang":
                await asyncio.sleep(10)
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    class Handle:
        def __init__(self, answer):
            self.info = Info(answer)

    answers = {"v1": {"ready": True, "max_model_len": 256}, "v2": "hang", "v3": RuntimeError("gone")}
    t = Traffic([], {}, connect=lambda d, app: Handle(answers[app]))
    t.apply(table(tiny={"versions": {"v1": 1, "v2": 1}, "shadow": {"app": "v3"}}))
    asyncio.run(t.probe(timeout_s=0.2))
    assert t.ready == {"v1/tiny": True, "v2/tiny": False, "v3/tiny": False}
    assert t.resolver.routes["tiny"].context_len == 256  # learnt from the ready replica (rate limits use it)


def test_a_version_that_leaves_the_table_gets_a_fresh_handle_when_it_returns():
    made = []
    t = Traffic([], {}, connect=lambda d, app: made.append(app) or f"{app}#{len(made)}")
    t.apply(table(tiny={"versions": {"v1": 1}}))
    t.mark_ready("v1/tiny", {"ready": True})
    t.apply(table(tiny={"versions": {"v2": 1}}))  # v1's application is deleted after this
    assert "v1/tiny" not in t.handles and "v1/tiny" not in t.ready
    t.apply(table(tiny={"versions": {"v1": 1, "v2": 0}}))  # ... and deployed anew: a new handle
    assert t.handles["v1/tiny"] == "v1#3"
