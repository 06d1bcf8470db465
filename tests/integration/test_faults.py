"""Faults end cleanly and heal without a person: a SIGKILLed engine process, a SIGKILLed replica.

Every request in flight ends with a typed error a client can read (a stream: an error event, then
``[DONE]``; a unary request: 503 with Retry-After, or a success when its retry found a live replica), never
a 500 or a silently truncated 200; then requests succeed again. Killed processes are ones this test
session's cluster started. Recovery is polled with a generous bound (no wall-clock assertion; the time to
the first success is printed and measured in the closing note of the fault issue).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
from ray import serve

from tests.integration.conftest import APP, wait_healthy

CODE = "def fibonacci(n):"
MODEL = "victim"


def victim_pids() -> dict[int, list[int]]:
    """replica pid -> its engine process ids, for both replicas (calls land on either at random)."""
    handle = serve.get_deployment_handle(MODEL, app_name=APP)
    found: dict[int, list[int]] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both replicas seen, and both engines ready (a restart may be ending)
        p = handle.pids.remote().result()
        found[p["replica"]] = p["engine"] if p["ready"] else []
        if len(found) == 2 and all(found.values()):
            return found
        time.sleep(0.05)
    raise AssertionError(f"two ready replicas of {MODEL} not found: {found}")


CUT = "<connection cut>"  # the stream's last item when the connection ended without a complete body


def stream_until_killed(base: str, started: concurrent.futures.Future | None) -> list[str]:
    events: list[str] = []
    with httpx.Client(base_url=base, timeout=120) as c, c.stream(
            "POST", "/v1/completions", json={"model": MODEL, "prompt": CODE, "max_tokens": 900, "ignore_eos": True,
                                             "stream": True}) as r:
        assert r.status_code == 200, r.read()
        try:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 2 and started is not None and not started.done():
                        started.set_result(True)
        except httpx.RemoteProtocolError:  # chunked body never terminated: the client library raises
            events.append(CUT)
    return events


def unary(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": CODE, "max_tokens": 600, "ignore_eos": True})


def first_success_after(base: str, since: float) -> float:
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=base, timeout=30) as c:
        while time.monotonic() < deadline:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": CODE, "max_tokens": 4})
            if r.status_code == 200:
                return time.monotonic() - since
            assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
            time.sleep(0.2)
    raise AssertionError(f"{MODEL} did not recover")


def check_stream_ended_cleanly(events: list[str]) -> None:
    """Either it finished, or its last data before [DONE] is an OpenAI error event: never truncated."""
    assert events and events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    if "error" in last:
        assert last["error"]["code"] in {"replica_failed", "engine_restarting"}, last
    else:
        assert last["choices"][0]["finish_reason"] == "length", last


def under_load_kill(base: str, pids: list[int], n_unary: int) -> tuple[list[list[str]], list[httpx.Response], float]:
    """4 streams (each past its second event) and ``n_unary`` unary requests in flight, then SIGKILL ``pids``:
    the streams' events, the unary responses, and when the kill happened."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        started = [concurrent.futures.Future() for _ in range(4)]
        streams = [pool.submit(stream_until_killed, base, s) for s in started]
        unaries = [pool.submit(unary, base) for _ in range(n_unary)]
        concurrent.futures.wait(started, timeout=120)
        killed_at = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # processes of the cluster this test session started
        return [s.result(timeout=180) for s in streams], [u.result(timeout=180) for u in unaries], killed_at


def test_killed_engine_processes_fail_in_flight_requests_and_heal(server):
    pids = victim_pids()
    engines = [pid for group in pids.values() for pid in group]
    assert len(engines) == 2  # one engine process per replica
    results, answers, killed_at = under_load_kill(server, engines, n_unary=2)
    for events in results:
        check_stream_ended_cleanly(events)
    assert any("error" in json.loads(e[-2]) for e in results), "no stream saw the kill"
    for r in answers:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.headers["retry-after"] and r.json()["error"]["code"] in {"replica_failed", "engine_restarting"}
    print(f"engine processes killed: first success after {first_success_after(server, killed_at):.1f} s")
    after = victim_pids()
    assert set(after) == set(pids), "the replicas were replaced; the engines should restart in place"
    assert not {p for g in after.values() for p in g} & set(engines)


def test_killed_replica_ends_streams_with_an_error_and_heals(router_url):
    """The router path: the router outlives the replica, so it ends the replica's streams with an error event."""
    replica_killed_and_healed(router_url, check_stream_ended_cleanly)


def test_killed_replica_on_the_direct_path(server):
    """The direct path: the killed replica held its streams' sockets, so they end cut, and the client library
    raises (an unterminated chunked body), never a stream that looks complete; streams on the other replica
    finish; unary requests are retried by the front on the live replica (or 503); the front stops sending
    to the dead listener and the replacement registers."""
    def check(events: list[str]) -> None:
        if events[-1] != CUT:
            check_stream_ended_cleanly(events)

    replica_killed_and_healed(server, check)


def replica_killed_and_healed(server: str, check) -> None:
    pids = victim_pids()
    doomed = next(iter(pids))
    results, answers, killed_at = under_load_kill(server, [doomed], n_unary=3)
    for events in results:
        check(events)
    for r in answers:  # a unary request on the dead replica is retried once on the other: 200 or a clean 503
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.headers["retry-after"]
    print(f"replica killed: first success after {first_success_after(server, killed_at):.1f} s")
    assert wait_healthy(server, 180), "Serve did not replace the killed replica"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # the replacement comes up: two replicas again, the dead one gone
        try:
            now = victim_pids()
        except AssertionError:
            time.sleep(1)
            continue
        if doomed not in now:
            break
    else:
        raise AssertionError("the killed replica was not replaced")
