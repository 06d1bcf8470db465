"""A model replica that answers HTTP for its own model: the hop-free streaming path.

On the Serve path a token crosses the Serve proxy, the router replica and the model replica, three Python
processes that each handle every chunk. Here the model replica, the process that holds the engine client,
listens itself (uvicorn on the replica's own event loop, a port of its own) and runs the same request
pipeline and OpenAI routes as the router (``deployments/ingress/routes.py``); a front HAProxy
(``deployments/front.py``) sends each request to a replica of the model its body names. Between the engine
and the client socket a token then crosses one Python process, and every SSE line is encoded once.

Routes: POST /v1/completions and /v1/chat/completions (for this model only), GET /health (this replica:
200 while its engine is ready, for HAProxy's health checks). Everything else stays on the router.

Example (in a replica; ``server`` has ``generate_stream``):
    >>> listener = DirectListener("tiny-code-llama", server.generate_stream, Limits())  # doctest: +SKIP
    >>> port = await listener.start("127.0.0.1")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from deployments.gateway.settings import GatewaySettings
from deployments.ingress.generate import loop_deadline, timeout_error
from deployments.ingress.observe import RequestObserver
from deployments.ingress.protocol import ChatCompletionRequest, CompletionRequest
from deployments.ingress.routes import chat_call, completion_call, error_response, events, parse, respond
from deployments.ingress.stages import Incoming, Limits, Pipeline, request_id
from deployments.messages import Chunk, ErrorInfo, GenerateRequest, ServeError, invalid

logger = logging.getLogger("ray.serve")

Generate = Callable[[GenerateRequest], AsyncIterator["Chunk | ErrorInfo"]]


@dataclass(frozen=True)
class DirectOptions:
    """Config: ``router.mode: direct``. ``host``: the address the replica's listener binds (the node's)."""

    host: str = "127.0.0.1"
    limits: Limits = field(default_factory=Limits)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)


class LocalStream:
    """A generation in this process, with the router's ReplicaStream interface (no retry: nothing else
    could answer a refusal here; the front's health check moves traffic off a failing replica)."""

    def __init__(self, generate: Generate, request: GenerateRequest) -> None:
        self.request = request
        self._gen = generate(request)
        self._closing: asyncio.Future | None = None
        self.first: Chunk | None = None

    async def start(self) -> Chunk:
        """The first chunk, or ServeError (a refusal; 504 past the request's deadline)."""
        try:
            async with asyncio.timeout_at(loop_deadline(self.request.deadline)):
                first = await self._gen.__anext__()
        except StopAsyncIteration:
            raise ServeError(ErrorInfo(500, "the replica ended the stream without output",
                                       code="internal_error")) from None
        except TimeoutError:
            self.cancel()
            raise ServeError(timeout_error(self.request.request_id)) from None
        if isinstance(first, ErrorInfo):
            await self._gen.aclose()
            raise ServeError(first)
        self.first = first
        return first

    async def rest(self) -> AsyncIterator[Chunk | ErrorInfo]:
        """The chunks after the first; past the deadline a final 504 item (the generation is aborted). The
        deadline bounds each wait for the engine, never a yield: a slow reader is the caller's to handle."""
        deadline = loop_deadline(self.request.deadline)
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await self._gen.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                yield timeout_error(self.request.request_id)
                return
            yield item

    def cancel(self) -> None:
        # Closing the generator runs the engine's abort (its ``finally``) on the next loop turn.
        self._closing = asyncio.ensure_future(self._gen.aclose())


async def whole(stream: LocalStream) -> list[Chunk]:
    chunks = [await stream.start()]
    async for item in stream.rest():
        if isinstance(item, ErrorInfo):
            raise ServeError(item)
        chunks.append(item)
    return chunks


async def until_disconnect(request: Request, work: Any, stream: LocalStream) -> Any:
    """``work``'s result, unless the client leaves first: then the generation is aborted (its slot freed)
    and ClientDisconnect raised. The router path gets this from Serve cancelling the call."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    stream.cancel()
    raise ClientDisconnect()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class DirectApp:
    """The ASGI app of one model replica's own listener."""

    def __init__(self, model: str, generate: Generate, limits: Limits, ready: Callable[[], bool],
                 observer: RequestObserver | None = None, gateway: GatewaySettings | None = None,
                 context_len: int | None = None) -> None:
        self.model, self.generate, self.ready = model, generate, ready
        gateway = gateway or GatewaySettings()
        self.pipeline = Pipeline(limits, gateway.authenticator(), gateway.rate_limiter(lambda m: context_len))
        self.policy = gateway.http_policy()
        self.observer = observer or RequestObserver("direct")
        self.in_flight = 0  # requests being answered (a draining replica waits for them)
        self.draining = False  # set at shutdown: /health answers 503, so the front stops sending here

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan and websockets: nothing to do here
            return
        self.in_flight += 1
        try:
            request = Request(scope, receive)
            response = await self.handle(request)
            await response(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def handle(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        headers = {k.lower(): v for k, v in request.headers.items()}
        rid = request_id(headers)
        if (method, path) == ("GET", "/health"):  # HAProxy's checks: not requests, not recorded
            ok = self.ready() and not self.draining
            response: Response = JSONResponse({"status": "ok" if ok else "unavailable", "model": self.model},
                                              status_code=200 if ok else 503)
            response.headers["x-modelfleet-path"] = "direct"
            return response
        obs = self.observer
        outcome = obs.begin(rid, path if path in ("/v1/completions", "/v1/chat/completions") else "other", method,
                            headers.get("traceparent"))
        try:
            self.policy.check_host(headers)
            if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                a = await self.pipeline.admit(Incoming(method, path, headers, request.stream()), rid, outcome)
                if (a.body or {}).get("model") == self.model:  # this replica's model: a bounded label
                    outcome.model = self.model
                schema = CompletionRequest if path == "/v1/completions" else ChatCompletionRequest
                req = parse(schema, a.body or {})
                if req.model != self.model:
                    raise ServeError(ErrorInfo(404, f"model {req.model!r} is not served on this port (it serves "
                                               f"{self.model!r})", param="model", code="model_not_found"))
                outcome.model = self.model
                obs.with_body(outcome, a.body)
                gen, shaper = (completion_call if schema is CompletionRequest else chat_call)(a, req)
                stream = LocalStream(self.generate, gen)
                if req.streaming:  # once streaming, Starlette watches for the client leaving
                    await until_disconnect(request, stream.start(), stream)
                    obs.stream_started(outcome)
                    end = functools.partial(obs.end, outcome)
                    out = events(obs.watch(stream, outcome), shaper, req.include_usage, end)
                    # A stream dropped before its first iteration never runs its finally: end it all the same.
                    weakref.finalize(out, end)
                    weakref.finalize(out, stream.cancel)
                    response = respond(out)
                else:
                    chunks = await until_disconnect(request, whole(stream), stream)
                    for c in chunks:
                        outcome.chunk(c)
                    response = respond(shaper.whole(chunks))
            else:
                raise invalid(f"no route {method} {path} on a model's own port", code="not_found", status=404)
        except ServeError as err:
            outcome.fail(err.info)
            response = error_response(err.info)
        except (ClientDisconnect, asyncio.CancelledError) as err:
            outcome.fail(ErrorInfo(499, "client disconnected", code="client_disconnected"))
            obs.end(outcome)
            if isinstance(err, asyncio.CancelledError):
                raise
            return Response(status_code=499)
        except Exception:
            logger.exception("request %s %s %s failed", rid, method, path)
            info = ErrorInfo(500, f"internal error (request {rid})", code="internal_error")
            outcome.fail(info)
            response = error_response(info)
        if not outcome.streaming:  # a stream is recorded when it ends
            obs.end(outcome, response.status_code)
        response.headers.update(outcome.response_headers)  # x-ratelimit-* of a limited key
        if "origin" in headers:
            response.headers.update(self.policy.response_headers(headers))
        response.headers["x-request-id"] = rid
        response.headers["x-modelfleet-path"] = "direct"  # which path answered (the router's says nothing)
        return response


class DirectListener:
    """uvicorn serving a ``DirectApp`` on this process's running event loop, on a port of its own."""

    def __init__(self, model: str, generate: Generate, limits: Limits, ready: Callable[[], bool],
                 observer: RequestObserver | None = None, gateway: GatewaySettings | None = None,
                 context_len: int | None = None) -> None:
        self.app = DirectApp(model, generate, limits, ready, observer, gateway, context_len)
        self.port: int | None = None
        self._server: Any = None
        self._task: asyncio.Task | None = None

    def start(self, host: str, port: int = 0) -> int:
        """Bind now (so the port is known at once) and serve on the running loop; returns the port."""
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=75)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the replica owns its signals
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        logger.info("model %s answers HTTP directly on %s:%d", self.app.model, host, self.port)
        return self.port

    async def stop(self, drain_s: float = 30.0) -> None:
        """Drain: /health turns 503 (the front takes this replica out within a second), the requests in
        flight finish (up to ``drain_s``), then the listener closes."""
        self.app.draining = True
        loop = asyncio.get_running_loop()
        until = loop.time() + drain_s
        await asyncio.sleep(1.0)  # the front's checks (250 ms apart once failing, 2 to mark it down)
        while self.app.in_flight and loop.time() < until:
            await asyncio.sleep(0.1)
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await asyncio.wait([self._task], timeout=5)
        await self.app.pipeline.close()
