"""A listener of the metrics hub's own for ``GET /metrics`` (``gateway.metrics: local``).

With API keys on, the public ingress either wants a key for ``/metrics`` or (``local``) does not answer it at
all; then Prometheus scrapes this listener, bound to a local or private address that clients cannot reach.
A bare ASGI app on uvicorn, on the hub actor's event loop.

Example:
    >>> async def render(accept: str) -> tuple[bytes, str]:
    ...     return b"up 1\\n", "text/plain"
    >>> async def demo() -> int:
    ...     task, port = await serve_metrics(render, "127.0.0.1", 0)
    ...     task.cancel()
    ...     return port
    >>> asyncio.run(demo()) > 0
    True
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("ray.serve")

Render = Callable[[str], Awaitable[tuple[bytes, str]]]


async def serve_metrics(render: Render, host: str, port: int) -> tuple[asyncio.Task, int]:
    """Bind now (so an address in use fails the caller at once), serve on the running loop."""
    import uvicorn

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"].rstrip("/") != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"only GET /metrics here\n"})
            return
        accept = dict(scope["headers"]).get(b"accept", b"").decode("latin-1")
        body, ctype = await render(accept)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    server.install_signal_handlers = lambda: None  # the actor owns its signals
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    bound = sock.getsockname()[1]
    logger.info("metrics: GET /metrics on %s:%d", host, bound)
    return task, bound
