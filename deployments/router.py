"""The ingress: OpenAI-compatible HTTP routes in front of the model deployments.

POST /v1/completions, /v1/chat/completions (both with ``stream: true`` as server-sent events ending in
``data: [DONE]``), /v1/embeddings; GET /v1/models, /health. Requests reach a model by the ``model`` field.
Client mistakes are 4xx with an OpenAI error body; overload is 503 with Retry-After; never a 500 for input.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
)
from deployments.responses import (
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    embedding_response,
    usage_chunk,
)

logger = logging.getLogger("ray.serve")


def _error_response(err: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OpenAIError(400, f"request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from err


@serve.deployment
class Router:
    """The HTTP ingress; Python callers may also use ``completions`` / ``chat`` / ``embeddings`` on its handle.

    Example:
        >>> h = serve.get_app_handle("modelfleet")
        >>> await h.completions.remote({"model": "tiny-code-llama", "prompt": "def f():", "max_tokens": 8})
    """

    def __init__(self, llms: dict[str, DeploymentHandle], embedders: dict[str, DeploymentHandle],
                 retry_after_s: int = 1, health_timeout_s: float = 5.0, cold_start_timeout_s: float = 120.0,
                 on_demand: list[str] | None = None) -> None:
        self.llms = llms
        self.embedders = embedders
        self.retry_after_s = retry_after_s
        self.health_timeout_s = health_timeout_s
        self.cold_start_timeout_s = cold_start_timeout_s
        self.on_demand = set(on_demand or ())  # may sit at zero replicas: health must not wake them

    # ---- HTTP -------------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        root = request.scope.get("root_path", "")  # the app's route_prefix, when it is not "/"
        if root and path.startswith(root):
            path = path[len(root):]
        path = path.rstrip("/")
        routes = {
            ("POST", "/v1/completions"): self._http_completions,
            ("POST", "/v1/chat/completions"): self._http_chat,
            ("POST", "/v1/embeddings"): self._http_embeddings,
            ("GET", "/v1/models"): self._http_models,
            ("GET", "/health"): self._http_health,
        }
        handler = routes.get((method, path))
        try:
            if handler is None:
                if any(p == path for _, p in routes):
                    raise OpenAIError(405, f"method {method} not allowed on {path}")
                raise OpenAIError(404, f"no route {method} {path}", code="not_found")
            return await handler(request)
        except OpenAIError as err:
            return _error_response(err)
        except Exception as err:  # a server fault (a dead replica...): still an OpenAI body, logged with trace
            logger.exception("request %s %s failed", method, path)
            return _error_response(OpenAIError(500, f"internal error: {type(err).__name__}", code="internal_error"))

    async def _http_completions(self, request: Request) -> Response:
        return await self._respond(await self.completions(_parse(CompletionRequest, await request.body())))

    async def _http_chat(self, request: Request) -> Response:
        return await self._respond(await self.chat(_parse(ChatCompletionRequest, await request.body())))

    async def _http_embeddings(self, request: Request) -> Response:
        return JSONResponse(await self.embeddings(_parse(EmbeddingRequest, await request.body())))

    async def _http_models(self, request: Request) -> Response:
        return JSONResponse(self.models())

    async def _http_health(self, request: Request) -> Response:
        status = await self.health()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    async def _respond(self, result: dict[str, Any] | AsyncIterator[dict[str, Any]]) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)

        async def sse() -> AsyncIterator[str]:
            async for event in result:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def completions_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Streaming for handle callers: ``handle.options(stream=True).completions_stream.remote(body)``."""
        async for event in await self.completions({**body, "stream": True}):
            yield event

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for event in await self.chat({**body, "stream": True}):
            yield event

    # ---- Python API (also behind HTTP) --------------------------------------------------------------------
    async def completions(self, body: dict[str, Any] | CompletionRequest) -> dict[str, Any] | AsyncIterator[dict]:
        req = body if isinstance(body, CompletionRequest) else _parse(CompletionRequest, json.dumps(body).encode())
        work = {"prompt": req.single_prompt(), "sampling": req.sampling(default_max_tokens=16),
                "logprobs": req.logprobs}
        return await self._generate(req, work, completion_response, completion_chunk)

    async def chat(self, body: dict[str, Any] | ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[dict]:
        req = body if isinstance(body, ChatCompletionRequest) else _parse(ChatCompletionRequest,
                                                                          json.dumps(body).encode())
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        work = {"messages": messages, "sampling": req.sampling(default_max_tokens=None),
                "logprobs": (req.top_logprobs or 0) if req.logprobs else None}
        return await self._generate(req, work, chat_response, chat_chunk)

    async def embeddings(self, body: dict[str, Any] | EmbeddingRequest) -> dict[str, Any]:
        req = body if isinstance(body, EmbeddingRequest) else _parse(EmbeddingRequest, json.dumps(body).encode())
        handle = self.embedders.get(req.model)
        if handle is None:
            raise self._unknown_model(req.model, self.embedders)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if any(not t for t in texts):
            raise OpenAIError(400, "input must not contain empty strings", param="input")
        if req.dimensions is not None:
            raise OpenAIError(400, "this model does not support 'dimensions'", param="dimensions")
        try:
            result = await handle.embed.remote(texts)
        except BackPressureError as err:
            raise self._overloaded(req.model) from err
        return embedding_response(req.model, result, req.encoding_format)

    def models(self) -> dict[str, Any]:
        data = [{"id": name, "object": "model", "owned_by": "modelfleet", "kind": kind}
                for kind, group in (("llm", self.llms), ("embedding", self.embedders)) for name in group]
        return {"object": "list", "data": data}

    async def health(self) -> dict[str, Any]:
        """Ready only when every model has a ready replica."""
        handles = {n: h for n, h in {**self.llms, **self.embedders}.items() if n not in self.on_demand}

        async def probe(handle: DeploymentHandle) -> bool:
            try:
                await asyncio.wait_for(handle.info.remote(), timeout=self.health_timeout_s)
                return True
            except Exception:
                return False

        ready = await asyncio.gather(*(probe(h) for h in handles.values()))
        models = {name: ("ready" if ok else "unavailable") for name, ok in zip(handles, ready, strict=True)}
        models.update({name: "on-demand" for name in self.on_demand})
        return {"status": "ok" if all(ready) else "unavailable", "models": models}

    # ---- internals --------------------------------------------------------------------------------------
    def _unknown_model(self, name: str, group: dict[str, DeploymentHandle]) -> OpenAIError:
        return OpenAIError(404, f"model {name!r} not found; available: {', '.join(sorted(group)) or 'none'}",
                           param="model", code="model_not_found")

    def _overloaded(self, name: str) -> OpenAIError:
        return OpenAIError(503, f"model {name!r} is overloaded, retry later", type_="server_error",
                           code="overloaded", retry_after=self.retry_after_s)

    async def _generate(self, req: Any, work: dict[str, Any], whole: Any,
                        chunk: Any) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        handle = self.llms.get(req.model)
        if handle is None:
            raise self._unknown_model(req.model, self.llms)
        stream = handle.options(stream=True).generate_stream.remote(work)
        try:
            # Held here while a replica starts (scale from zero) or the queue drains; bounded, then a 503.
            first = await asyncio.wait_for(stream.__anext__(), timeout=self.cold_start_timeout_s)
        except BackPressureError as err:
            raise self._overloaded(req.model) from err
        except TimeoutError as err:
            stream.cancel()
            raise OpenAIError(503, f"model {req.model!r} did not start answering within "
                              f"{self.cold_start_timeout_s:.0f} s (scaling up?); retry", type_="server_error",
                              code="unavailable", retry_after=self.retry_after_s) from err
        if "error" in first:
            raise OpenAIError.from_item(first)
        if not req.stream:
            items = [first]
            async for item in stream:
                if "error" in item:
                    raise OpenAIError.from_item(item)
                items.append(item)
            return whole(req, items)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._events(req, first, stream, chunk, include_usage)

    async def _events(self, req: Any, first: dict[str, Any], stream: Any, chunk: Any,
                      include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """OpenAI stream chunks as dicts; an error mid-stream becomes a final error event."""
        state: dict[str, Any] = {}
        last = first
        try:
            for event in chunk(req, first, state):
                yield event
            async for item in stream:
                if "error" in item:
                    yield OpenAIError.from_item(item).body()
                    return
                last = item
                for event in chunk(req, item, state):
                    yield event
            if include_usage:
                yield usage_chunk(req, last, state)
        finally:
            stream.cancel()  # a disconnected client: stop the replica's generation, free its KV blocks
