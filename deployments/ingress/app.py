"""The ingress deployment: routes over the stage pipeline, the resolver and the replicas.

POST /v1/completions, /v1/chat/completions (``stream: true`` as server-sent events ending in
``data: [DONE]``), /v1/embeddings; GET /v1/models, /health, /openapi.json. Every response carries the
request's ``x-request-id``. Client mistakes are 4xx with OpenAI's error body, overload and failed replicas
503 with Retry-After, a passed deadline 504; a 500 means a bug, logged with the request id.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.ingress.generate import REPLICA_GONE, CallPolicy, ReplicaStream, generate_whole
from deployments.ingress.openapi import openapi_document
from deployments.ingress.protocol import INT32, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from deployments.ingress.resolve import ModelRoute, Resolver
from deployments.ingress.responses import Shaper, embedding_response
from deployments.ingress.shed import Shedder, Ticket
from deployments.ingress.stages import Admitted, Incoming, Limits, Pipeline, request_id
from deployments.messages import ErrorInfo, GenerateRequest, ServeError, invalid, unavailable

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class RouterSettings:
    """Plain values the cluster hands the ingress (config: ``router``)."""

    limits: Limits = field(default_factory=Limits)
    call: CallPolicy = field(default_factory=CallPolicy)
    health_timeout_s: float = 5.0


def validation_error(err: ValidationError) -> ServeError:
    """The most telling pydantic error as a 400 naming the field (``messages.0.content``): for a union, the
    branch of the input's own type (a type mismatch only says another branch was not meant), then the
    deepest location."""
    def clean(loc: tuple) -> list[str]:  # drop union-member tags (``str``, ``list[TextPart]``): not field names
        return [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "-" in p))]

    first = min(err.errors(), key=lambda e: (e["type"].endswith("_type"), -len(clean(e["loc"]))))
    param = ".".join(clean(first["loc"])) or None
    kind = first["type"]
    code = _CODES.get(kind) or ("invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")
    if kind == "literal_error" and param and param.startswith("messages.") and param.endswith(".type"):
        code = "unsupported_content"  # an image, audio or file part: this model reads text only
    return invalid(f"{param}: {first['msg']}" if param else first["msg"], param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
# pydantic's error type -> OpenAI's code (what its API answers for the same mistake); the rest: invalid_value
_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter",
          "json_invalid": "invalid_json"}


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from None


def error_response(info: ErrorInfo) -> JSONResponse:
    return JSONResponse(info.body(), status_code=info.status, headers=info.headers())


@serve.deployment
class Router:
    """The HTTP ingress; Python callers use ``completions`` / ``chat`` / ``embeddings`` on its handle.

    Example:
        >>> h = serve.get_app_handle("modelfleet")
        >>> h.completions.remote({"model": "tiny-code-llama", "prompt": "def f():", "max_tokens": 8}).result()
    """

    def __init__(self, handles: dict[str, DeploymentHandle], routes: list[ModelRoute],
                 settings: RouterSettings | None = None) -> None:
        self.handles = handles
        self.resolver = Resolver(routes)
        self.settings = settings or RouterSettings()
        self.pipeline = Pipeline(self.settings.limits)
        self.shedder = Shedder()
        self.openapi = json.dumps(openapi_document([r.model for r in routes if r.kind == "llm"],
                                                   [r.model for r in routes if r.kind == "embedding"])).encode()
        self.routes: dict[tuple[str, str], Callable[[Admitted], Awaitable[Response]]] = {
            ("POST", "/v1/completions"): self._http_completions,
            ("POST", "/v1/chat/completions"): self._http_chat,
            ("POST", "/v1/embeddings"): self._http_embeddings,
            ("GET", "/v1/models"): self._http_models,
            ("GET", "/health"): self._http_health,
            ("GET", "/openapi.json"): self._http_openapi,
        }

    # ---- HTTP -------------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        root = request.scope.get("root_path", "")  # the app's route_prefix, when it is not "/"
        if root and path.startswith(root):
            path = path[len(root):]
        path = path.rstrip("/") or "/"
        headers = {k.lower(): v for k, v in request.headers.items()}
        rid = request_id(headers)  # Serve's proxy put the client's id (or one of its own) in x-request-id
        try:
            handler = self.routes.get((method, path))
            if handler is None:
                if any(p == path for _, p in self.routes):
                    raise invalid(f"method {method} not allowed on {path}", code="method_not_allowed", status=405)
                raise invalid(f"no route {method} {path}", code="not_found", status=404)
            admitted = await self.pipeline.admit(Incoming(method, path, headers, request.stream()), rid)
            response = await handler(admitted)
        except ServeError as err:
            response = error_response(err.info)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer (logged as 499)
            return Response(status_code=499)
        except Exception:  # a bug: still OpenAI's body, logged with the request id
            logger.exception("request %s %s %s failed", rid, method, path)
            response = error_response(ErrorInfo(500, f"internal error (request {rid})", code="internal_error"))
        if headers.get("x-request-id") != rid:  # Serve's proxy echoes the id it forwarded; add ours only if new
            response.headers["x-request-id"] = rid
        return response

    async def _http_completions(self, a: Admitted) -> Response:
        return self._respond(await self._completions(a, parse(CompletionRequest, a.body or {})))

    async def _http_chat(self, a: Admitted) -> Response:
        return self._respond(await self._chat(a, parse(ChatCompletionRequest, a.body or {})))

    async def _http_embeddings(self, a: Admitted) -> Response:
        return JSONResponse(await self._embeddings(parse(EmbeddingRequest, a.body or {})))

    async def _http_models(self, a: Admitted) -> Response:
        return JSONResponse(self.models())

    async def _http_health(self, a: Admitted) -> Response:
        status = await self.health()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    async def _http_openapi(self, a: Admitted) -> Response:
        return Response(self.openapi, media_type="application/json")

    def _respond(self, result: dict[str, Any] | AsyncIterator[dict[str, Any]]) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)

        async def sse() -> AsyncIterator[str]:
            async for event in result:
                yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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

    def models(self) -> dict[str, Any]:
        data = [{"id": r.model, "object": "model", "owned_by": "modelfleet", "kind": r.kind}
                for r in self.resolver.routes.values()]
        return {"object": "list", "data": data}

    def ingress_stats(self) -> dict[str, Any]:
        """This router replica's own counts: requests in flight per model deployment, requests shed here."""
        return {"in_flight": dict(self.shedder.in_flight), "shed": self.shedder.shed}

    async def health(self) -> dict[str, Any]:
        """Ready only when every model (but those that may sit at zero replicas) has a ready replica."""
        routes = [r for r in self.resolver.routes.values() if not r.on_demand]

        async def probe(route: ModelRoute) -> bool:
            try:
                info = await asyncio.wait_for(self.handles[route.targets[0].deployment].info.remote(),
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
        prompt = req.single_prompt()
        gen = GenerateRequest(a.request_id, prompt=prompt if isinstance(prompt, str) else tuple(prompt),
                              params=req.sampling_params(req.requested_max_tokens(), req.logprobs),
                              deadline=a.deadline, model=req.model)
        shaper = Shaper("completion", req.model, req.logprobs, echo=prompt if req.echo else "")  # type: ignore[arg-type]
        return await self._generate(req, gen, shaper)

    async def _chat(self, a: Admitted, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[dict]:
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.requested_max_tokens()
        gen = GenerateRequest(a.request_id, messages=req.turns(), params=req.sampling_params(max_tokens or INT32, top),
                              fill_max_tokens=max_tokens is None, deadline=a.deadline, model=req.model)
        return await self._generate(req, gen, Shaper("chat", req.model, top))

    def _admit_to(self, model: str, target: str) -> Ticket:
        """A ticket for one request to ``target``, or a 503 at once while its replicas are known full."""
        retry_after = self.shedder.check(target)
        if retry_after is not None:
            raise unavailable(f"model {model!r} is overloaded, retry later", "overloaded", retry_after)
        return self.shedder.enter(target)

    async def _generate(self, req: Any, gen: GenerateRequest, shaper: Shaper) -> dict[str, Any] | AsyncIterator:
        target = self.resolver.resolve(req.model, "llm", key=req.user).deployment
        handle = self.handles[target]
        ticket = self._admit_to(req.model, target)
        refused: float | None = None
        try:
            if not req.streaming:
                return shaper.whole(await generate_whole(handle, gen, self.settings.call))
            stream = ReplicaStream(handle, gen, self.settings.call)
            await stream.start()  # refusals (400, 503...) surface here, as a status, before the stream starts
            events, ticket = self._events(stream, shaper, req.include_usage, ticket), None  # it leaves at the end
            return events
        except ServeError as err:
            if err.info.code == "overloaded":
                refused = err.info.retry_after_s or self.settings.call.retry_after_s
            raise
        finally:
            if ticket is not None:
                self.shedder.leave(ticket, refused)

    async def _events(self, stream: ReplicaStream, shaper: Shaper, include_usage: bool,
                      ticket: Ticket) -> AsyncIterator[dict]:
        """OpenAI stream chunks; a failure mid-stream becomes a final error event (then ``[DONE]``)."""
        last = stream.first
        assert last is not None
        try:
            for event in shaper.events(last):
                yield event
            async for item in stream.rest():
                if isinstance(item, ErrorInfo):
                    yield item.body()
                    return
                last = item
                for event in shaper.events(item):
                    yield event
            if include_usage:
                yield shaper.usage_event(last)
        finally:
            stream.cancel()  # a disconnected client: stop the replica's generation, free its KV blocks
            self.shedder.leave(ticket)

    async def _embeddings(self, req: EmbeddingRequest) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        handle = self.handles[self.resolver.resolve(req.model, "embedding", key=req.user).deployment]
        policy = self.settings.call
        try:
            result = await handle.embed.remote(req.texts())
        except BackPressureError as err:
            raise unavailable(f"model {req.model!r} is overloaded, retry later", "overloaded",
                              policy.retry_after_s) from err
        except REPLICA_GONE as err:
            raise unavailable(f"model {req.model!r}: its replica failed ({type(err).__name__}); retry",
                              "replica_failed", policy.retry_after_s) from err
        if isinstance(result, ErrorInfo):
            raise ServeError(result)
        return embedding_response(req.model, result, req.encoding_format)
