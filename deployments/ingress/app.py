"""The ingress deployment: routes over the stage pipeline, the resolver and the replicas.

POST /v1/completions, /v1/chat/completions (``stream: true`` as server-sent events ending in
``data: [DONE]``), /v1/embeddings; GET /v1/models, /health, /openapi.json, /metrics (every replica's, from
the metrics hub: Prometheus text, or OpenMetrics by the Accept header). Every response carries the
request's ``x-request-id``. Client mistakes are 4xx with OpenAI's error body, overload and failed replicas
503 with Retry-After, a passed deadline 504; a 500 means a bug, logged with the request id.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from deployments.gateway.auth import visible
from deployments.ingress.extras import ask_replica, detokenize_call, tokenize_call
from deployments.ingress.generate import REPLICA_GONE, ReplicaStream, generate_whole
from deployments.ingress.mirror import Tap, TappedStream, ended
from deployments.ingress.observe import PREFLIGHT, Outcome
from deployments.ingress.openapi import openapi_document
from deployments.ingress.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from deployments.ingress.resolve import ModelRoute, Resolver, Target
from deployments.ingress.responses import Shaper, embedding_response
from deployments.ingress.rollouts import Rollouts
from deployments.ingress.routes import chat_call, completion_call, error_response, events, parse, respond
from deployments.ingress.settings import RouterSettings, once
from deployments.ingress.shed import Shedder, Ticket
from deployments.ingress.stages import Admitted, Incoming, Pipeline, request_id
from deployments.ingress.traffic import Traffic
from deployments.ingress.versions import VersionTable
from deployments.messages import ErrorInfo, GenerateRequest, ServeError, invalid, unavailable
from deployments.metrics_hub import hub
from deployments.telemetry import Telemetry

logger = logging.getLogger("ray.serve")
MODEL_ROUTE = "/v1/models/{id}"


@serve.deployment
class Router:
    """The HTTP ingress; Python callers use ``completions`` / ``chat`` / ``embeddings`` on its handle.

    Its ``user_config`` is the version table (``versions.py``): models served by version applications, at
    weights, with shadows and canary analysis; ``serve deploy`` of a new table reconfigures the routers only.

    Example:
        >>> h = serve.get_app_handle("modelfleet")
        >>> h.completions.remote({"model": "tiny-code-llama", "prompt": "def f():", "max_tokens": 8}).result()
    """

    def __init__(self, handles: dict[str, DeploymentHandle], routes: list[ModelRoute],
                 settings: RouterSettings | None = None) -> None:
        self.traffic = Traffic(routes, handles, connect=lambda deployment, app: serve.get_deployment_handle(
            deployment, app_name=app, _check_exists=False))
        self.settings = settings or RouterSettings()
        gateway = self.settings.gateway
        self.pipeline = Pipeline(self.settings.limits, gateway.authenticator(),
                                 gateway.rate_limiter(self._context_len))
        self.policy = gateway.http_policy()
        if gateway.metrics == "local" and self.settings.observability.metrics:
            self._metrics_listener = asyncio.get_running_loop().create_task(self._listen_metrics())
        self.shedder = Shedder()
        self.telemetry = Telemetry.start(self.settings.observability, "router", None)
        self.observer = self.telemetry.observer
        self.rollouts = Rollouts(self.traffic, self.settings.call, self.observer.log, self.settings.health_timeout_s)
        self._hub = None
        self._describe()
        self.routes: dict[tuple[str, str], Callable[[Admitted], Awaitable[Response]]] = {
            ("POST", "/v1/completions"): self._http_completions,
            ("POST", "/v1/chat/completions"): self._http_chat,
            ("POST", "/v1/embeddings"): self._http_embeddings,
            ("GET", "/v1/models"): self._http_models,
            ("GET", MODEL_ROUTE): self._http_model,
            ("POST", "/tokenize"): self._http_tokenize,
            ("POST", "/detokenize"): self._http_detokenize,
            ("GET", "/health"): self._http_health,
            ("GET", "/openapi.json"): self._http_openapi,
            ("GET", "/metrics"): self._http_metrics,
        }

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """A new version table (the router's ``user_config``): weights, shadows, analyses; no replica restarts."""
        await self.rollouts.apply(VersionTable.model_validate(config or {}))
        self._describe()
        logger.info("version table: %s", {m: self.traffic.weights(m) for m in self.traffic.table.models})

    def _describe(self) -> None:
        routes = self.resolver.routes.values()
        self.openapi = json.dumps(openapi_document([r.model for r in routes if r.kind == "llm"],
                                                   [r.model for r in routes if r.kind == "embedding"])).encode()

    @property
    def resolver(self) -> Resolver:
        return self.traffic.resolver

    @property
    def handles(self) -> dict[str, DeploymentHandle]:
        return self.traffic.handles

    def _context_len(self, model: str) -> int | None:
        route = self.resolver.routes.get(model)
        return route.context_len if route is not None else None

    async def __del__(self) -> None:
        await self.rollouts.close()
        await self.pipeline.close()
        await self.telemetry.stop()

    # ---- HTTP -------------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        root = request.scope.get("root_path", "")  # the app's route_prefix, when it is not "/"
        if root and path.startswith(root):
            path = path[len(root):]
        path = path.rstrip("/") or "/"
        headers = {k.lower(): v for k, v in request.headers.items()}
        rid = request_id(headers)  # Serve's proxy put the client's id (or one of its own) in x-request-id
        route = MODEL_ROUTE if path.startswith("/v1/models/") else path
        head = method == "HEAD"  # a GET route's headers, without its body
        outcome = self.observer.begin(rid, route if any(p == route for _, p in self.routes) else "other", method,
                                      headers.get("traceparent"))
        try:
            self.policy.check_host(headers)  # before anything else: a rebound DNS name gets nothing
            method = "GET" if head else method
            handler = self.routes.get((method, route))
            if method == "OPTIONS" and (pre := self.policy.preflight(method, headers)) is not None:
                outcome.route = PREFLIGHT  # a browser asking first: not traffic, not recorded
                self.observer.end(outcome)
                return Response(status_code=pre[0], headers=pre[1])
            if handler is None:
                if any(p == route for _, p in self.routes):
                    raise invalid(f"method {method} not allowed on {path}", code="method_not_allowed", status=405)
                raise invalid(f"no route {method} {path}", code="not_found", status=404)
            admitted = await self.pipeline.admit(Incoming(method, path, headers, request.stream()), rid, outcome)
            named = (admitted.body or {}).get("model")
            if isinstance(named, str) and named in self.resolver.routes:  # a configured name: a bounded label
                outcome.model = named  # (set before parsing, so a refused request of a model counts for it)
            response = await handler(admitted)
        except ServeError as err:
            outcome.fail(err.info)
            response = error_response(err.info)
        except (ClientDisconnect, asyncio.CancelledError) as err:  # the client left (Serve cancels the call)
            outcome.fail(ErrorInfo(499, "client disconnected", code="client_disconnected"))
            self.observer.end(outcome)
            if isinstance(err, asyncio.CancelledError):
                raise
            return Response(status_code=499)  # left while sending its body: nobody to answer
        except Exception:  # a bug: still OpenAI's body, logged with the request id
            logger.exception("request %s %s %s failed", rid, method, path)
            info = ErrorInfo(500, f"internal error (request {rid})", code="internal_error")
            outcome.fail(info)
            response = error_response(info)
        if not outcome.streaming:  # a stream is recorded when it ends
            self.observer.end(outcome, response.status_code)
        response.headers.update(outcome.response_headers)  # x-ratelimit-* of a limited key, on every answer
        if "origin" in headers:
            response.headers.update(self.policy.response_headers(headers))
        if headers.get("x-request-id") != rid:  # Serve's proxy echoes the id it forwarded; add ours only if new
            response.headers["x-request-id"] = rid
        if head:
            return Response(status_code=response.status_code, headers=dict(response.headers))
        return response

    async def _http_completions(self, a: Admitted) -> Response:
        return respond(await self._completions(a, parse(CompletionRequest, a.body or {})))

    async def _http_chat(self, a: Admitted) -> Response:
        return respond(await self._chat(a, parse(ChatCompletionRequest, a.body or {})))

    async def _http_embeddings(self, a: Admitted) -> Response:
        return JSONResponse(await self._embeddings(parse(EmbeddingRequest, a.body or {}), a.outcome, a.principal))

    async def _http_models(self, a: Admitted) -> Response:
        return JSONResponse(self.models(a.principal))

    async def _http_health(self, a: Admitted) -> Response:
        status = await self.health()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    async def _http_model(self, a: Admitted) -> Response:
        wanted = a.route.removeprefix("/v1/models/")
        entry = next((m for m in self.models(a.principal)["data"] if m["id"] == wanted), None)
        if entry is None:
            raise invalid(f"model {wanted[:256]!r} not found", param="model", code="model_not_found", status=404)
        return JSONResponse(entry)

    async def _http_tokenize(self, a: Admitted) -> Response:
        model, req = tokenize_call(a.request_id, a.body or {})
        t = self.traffic.choose(model, "llm", principal=a.principal)
        return JSONResponse(await ask_replica(self.handles[t.key], model, self.settings.call,
                                              lambda h: h.tokenize.remote(req)))

    async def _http_detokenize(self, a: Admitted) -> Response:
        model, ids = detokenize_call(a.body or {})
        t = self.traffic.choose(model, "llm", principal=a.principal)
        return JSONResponse(await ask_replica(self.handles[t.key], model, self.settings.call,
                                              lambda h: h.detokenize.remote(ids)))

    async def _http_openapi(self, a: Admitted) -> Response:
        return Response(self.openapi, media_type="application/json")

    async def _http_metrics(self, a: Admitted) -> Response:
        if self.settings.gateway.metrics == "local":  # served by the metrics hub's own local listener only
            raise invalid(f"no route GET /metrics here (see {self.settings.gateway.metrics_listen})", code="not_found",
                          status=404)
        accept = a.headers.get("accept", "") if a.headers else ""
        body, content_type = await self.metrics(accept)
        return Response(body, media_type=content_type)

    async def _listen_metrics(self) -> None:
        """``gateway.metrics: local``: the hub answers /metrics on its own local address (every router asks;
        the hub listens once)."""
        host, _, port = self.settings.gateway.metrics_listen.rpartition(":")
        try:
            handle = await asyncio.to_thread(hub)
            await handle.listen.remote(host.strip("[]"), int(port))
        except Exception:
            logger.exception("the metrics hub could not listen on %s", self.settings.gateway.metrics_listen)

    async def metrics(self, accept: str = "") -> tuple[bytes, str]:
        """The whole cluster's metrics, rendered by the hub (``accept``: the scraper's Accept header)."""
        if self._hub is None:
            self._hub = await asyncio.to_thread(hub)
        try:
            return await asyncio.wait_for(self._hub.render.remote(accept), timeout=10)
        except Exception as err:
            self._hub = None
            raise unavailable(f"metrics are unavailable ({type(err).__name__}); retry", "metrics_unavailable",
                              self.settings.call.retry_after_s) from err

    # ---- Python API (the HTTP routes call the same code) ------------------------------------------------
    async def completions(self, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        return await self._completions(self.pipeline.for_handle("/v1/completions", body),
                                       parse(CompletionRequest, body))

    async def chat(self, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        return await self._chat(self.pipeline.for_handle("/v1/chat/completions", body),
                                parse(ChatCompletionRequest, body))

    async def completions_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Streaming for handle callers: ``handle.options(stream=True).completions_stream.remote(body)``."""
        async for event in await self.completions({**body, "stream": True}):
            yield event

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for event in await self.chat({**body, "stream": True}):
            yield event

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._embeddings(parse(EmbeddingRequest, body))

    def models(self, principal: Any = None) -> dict[str, Any]:
        """The served models (``principal``: a key's grant: only those it may use)."""
        shown = set(visible(principal, self.resolver.routes))
        data = []
        for r in self.resolver.routes.values():
            if r.model not in shown:
                continue
            entry = {"id": r.model, "object": "model", "owned_by": "modelfleet", "kind": r.kind}
            if r.version:
                entry |= {"version": r.version, "sha256": r.sha256}
            data.append(entry | self.traffic.listing(r.model))
        return {"object": "list", "data": data}

    def ingress_stats(self) -> dict[str, Any]:
        """This router replica's own counts: requests in flight per model deployment (``app/model`` for a
        version application's), requests shed here."""
        return {"in_flight": dict(self.shedder.in_flight), "shed": self.shedder.shed}

    def traffic_status(self) -> dict[str, Any]:
        """Each versioned model's versions as this router replica sees them (weight, ready, in flight)."""
        flight = self.shedder.in_flight
        return {m: [v | {"in_flight": flight.get(Target(m, 1.0, v["app"]).key, 0)}
                    for v in self.traffic.describe(m)] for m in self.traffic.table.models}

    async def health(self) -> dict[str, Any]:
        """Ready only when every model (but those that may sit at zero replicas) has a ready replica."""
        routes = [r for r in self.resolver.routes.values() if not r.on_demand]

        async def probe(route: ModelRoute) -> bool:
            if route.model in self.traffic.table.models:  # the version loop probes those every second
                return self.traffic.ready.get(self.traffic.choose(route.model, route.kind).key, False)
            try:
                info = await asyncio.wait_for(self.handles[route.targets[0].key].info.remote(),
                                              timeout=self.settings.health_timeout_s)
                return bool(info.get("ready", True))
            except Exception:  # timeout, a dead replica, none yet: not ready, whatever the reason
                return False

        ready = await asyncio.gather(*(probe(r) for r in routes))
        models = {r.model: ("ready" if ok else "unavailable") for r, ok in zip(routes, ready, strict=True)}
        models.update({r.model: "on-demand" for r in self.resolver.routes.values() if r.on_demand})
        return {"status": "ok" if all(ready) else "unavailable", "models": models}

    # ---- internals --------------------------------------------------------------------------------------
    async def _completions(self, a: Admitted, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[dict]:
        return await self._generate(req, *completion_call(a, req), a)

    async def _chat(self, a: Admitted, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[dict]:
        return await self._generate(req, *chat_call(a, req), a)

    def _admit_to(self, model: str, target: str) -> Ticket:
        """A ticket for one request to ``target``, or a 503 at once while its replicas are known full."""
        retry_after = self.shedder.check(target)
        if retry_after is not None:
            raise unavailable(f"model {model!r} is overloaded, retry later", "overloaded", retry_after)
        return self.shedder.enter(target)

    async def _generate(self, req: Any, gen: GenerateRequest, shaper: Shaper,
                        a: Admitted) -> dict[str, Any] | AsyncIterator:
        started = time.monotonic()
        caller = self.traffic.caller(req.model, req.user, a.headers)
        t = self.traffic.choose(req.model, "llm", key=caller, principal=a.principal)
        handle = self.handles[t.key]
        outcome: Outcome | None = a.outcome
        if outcome is not None:
            outcome.model = req.model  # resolved: a configured name, a bounded label
            outcome.version = self.traffic.version_of(t) if t.app else self.resolver.routes[req.model].version
            if t.app:
                outcome.response_headers["x-modelfleet-version"] = outcome.version
            self.observer.with_body(outcome, a.body)
        ticket = self._admit_to(req.model, t.key)  # (before a shadow copy is made: a shed request has none)
        listeners, first = self.rollouts.listeners(req.model, t, gen, started) if t.app else ([], None)
        tap: Tap | None = Tap(None, listeners) if listeners else None
        refused: float | None = None
        try:
            if not req.streaming:
                chunks = await generate_whole(handle, gen, self.settings.call, first)
                if outcome is not None:
                    for c in chunks:
                        outcome.chunk(c)
                if tap is not None:
                    for c in chunks:
                        tap.add(c)
                    tap.finish("ok")
                return shaper.whole(chunks)
            stream: Any = ReplicaStream(handle, gen, self.settings.call)
            await stream.start()  # refusals (400, 503...) surface here, as a status, before the stream starts
            if first is not None:
                first()
            if tap is not None:
                stream, tap = TappedStream(stream, tap), None  # the stream's end tells the listeners
            leave = functools.partial(self.shedder.leave, ticket)
            if outcome is not None:
                stream = self.observer.watch(stream, outcome)
                self.observer.stream_started(outcome)
                done = once(lambda: (leave(), self.observer.end(outcome)))
            else:
                done = once(leave)
            ticket = None
            out = events(stream, shaper, req.include_usage, done)  # the ticket leaves when the stream ends,
            weakref.finalize(out, done)  # or when the stream is dropped unstarted (its finally never runs)
            weakref.finalize(out, stream.cancel)
            return out
        except ServeError as err:
            if err.info.code == "overloaded":
                refused = err.info.retry_after_s or self.settings.call.retry_after_s
            if tap is not None:
                tap.finish(ended(err.info.status))
            raise
        finally:
            if tap is not None:
                tap.finish("cancelled")  # (no-op once finished) cancelled, or a bug: not the version's error
            if ticket is not None:
                self.shedder.leave(ticket, refused)

    async def _embeddings(self, req: EmbeddingRequest, outcome: Outcome | None = None,
                          principal: Any = None) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        handle = self.handles[self.traffic.choose(req.model, "embedding", key=req.user, principal=principal).key]
        if outcome is not None:
            outcome.model = req.model
        policy = self.settings.call
        try:
            result = await handle.embed.remote(req.inputs())
        except BackPressureError as err:
            raise unavailable(f"model {req.model!r} is overloaded, retry later", "overloaded",
                              policy.retry_after_s) from err
        except REPLICA_GONE as err:
            raise unavailable(f"model {req.model!r}: its replica failed ({type(err).__name__}); retry",
                              "replica_failed", policy.retry_after_s) from err
        if isinstance(result, ErrorInfo):
            raise ServeError(result)
        return embedding_response(req.model, result, req.encoding_format)
