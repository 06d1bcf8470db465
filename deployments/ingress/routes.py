"""The OpenAI routes as plain functions, shared by every place that answers HTTP: the router deployment
(which reaches replicas through handles) and a model replica that serves its own model directly
(``deployments/direct.py``). Ray-free: what differs between them is only where a generation's chunks come
from, behind ``Stream``.

    parse the body against the schema -> the GenerateRequest and its Shaper -> a Stream of chunks
    -> the OpenAI response (one JSON, or server-sent events ending in ``data: [DONE]``)

Example:
    >>> gen, shaper = completion_call(Admitted("r-1", "/v1/completions", 0.0, 600.0),
    ...                               parse(CompletionRequest, {"model": "m", "prompt": "def f():"}))
    >>> gen.params.max_tokens, shaper.kind
    (16, 'completion')
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.ingress.protocol import INT32, ChatCompletionRequest, CompletionRequest
from deployments.ingress.responses import Shaper
from deployments.ingress.stages import Admitted
from deployments.ingress.tools import ToolShaper
from deployments.messages import Chunk, ErrorInfo, GenerateRequest, ServeError, invalid

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
# pydantic's error type -> OpenAI's code (what its API answers for the same mistake); the rest: invalid_value
_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter",
          "json_invalid": "invalid_json"}


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


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from None


def error_response(info: ErrorInfo) -> JSONResponse:
    return JSONResponse(info.body(), status_code=info.status, headers=info.headers())


def completion_call(a: Admitted, req: CompletionRequest) -> tuple[GenerateRequest, Shaper]:
    prompts = [p if isinstance(p, str) else tuple(p) for p in req.prompts()]
    echo = bool(req.echo)
    # echo with logprobs scores the prompt too (vLLM: prompt_logprobs = logprobs), in the engine's prefill
    params = req.sampling_params(req.requested_max_tokens(), req.logprobs, req.logprobs if echo else None)
    gen = GenerateRequest(a.request_id, prompt=prompts[0] if len(prompts) == 1 else None,
                          prompts=tuple(prompts) if len(prompts) > 1 else (), params=params,
                          deadline=a.deadline, model=req.model, admitted_at=a.started,
                          traceparent=a.outcome.traceparent if a.outcome is not None else None,
                          echo=echo, echo_only=echo and req.max_tokens == 0)
    return gen, Shaper("completion", req.model, req.logprobs, len(prompts) * (req.n or 1))


def chat_call(a: Admitted, req: ChatCompletionRequest) -> tuple[GenerateRequest, Shaper]:
    top = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.requested_max_tokens()
    gen = GenerateRequest(a.request_id, messages=req.turns(), params=req.sampling_params(max_tokens or INT32, top),
                          fill_max_tokens=max_tokens is None, deadline=a.deadline, model=req.model,
                          admitted_at=a.started, traceparent=a.outcome.traceparent if a.outcome is not None else None,
                          tools=req.template_tools())
    shaper = Shaper("chat", req.model, top, req.n or 1)
    mode = req.tool_mode  # tool calls in the answer: the Shaper's bodies and events rewritten (tools.py)
    named = req.tool_choice.function.name if mode == "named" else None  # type: ignore[union-attr]
    return gen, ToolShaper(shaper, mode, named) if mode else shaper  # type: ignore[return-value]


class Stream(Protocol):
    """One generation's chunks: ``first`` already read (refusals surface before a response starts), the
    rest with any failure as a final ErrorInfo item, and ``cancel`` to abort it (a client that left)."""

    first: Chunk | None

    def rest(self) -> AsyncIterator[Chunk | ErrorInfo]: ...

    def cancel(self) -> None: ...


async def events(stream: Stream, shaper: Shaper, include_usage: bool,
                 on_end: Callable[[], None] | None = None) -> AsyncIterator[dict[str, Any]]:
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
        try:
            stream.cancel()  # a disconnected client: stop the generation, free its KV blocks
        finally:
            if on_end is not None:
                on_end()


def respond(result: dict[str, Any] | AsyncIterator[dict[str, Any]]) -> Response:
    """One JSON body, or server-sent events (each event encoded once, here) ending in ``data: [DONE]``."""
    if isinstance(result, dict):
        return JSONResponse(result)

    async def sse() -> AsyncIterator[bytes]:
        async for event in result:
            yield b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
