"""Typed, frozen messages between the ingress and the model replicas (they cross Ray process boundaries).

- ``GenerateRequest``: built once by the ingress; the replica receives it as is (prompt or chat turns,
  validated ``SamplingParams``, request id, deadline).
- ``Chunk``: what a replica streams back: the delta of text and token ids since its previous chunk, running
  token counts, logprobs rendered as token strings. Deltas end to end; accumulated once, at the edge. A
  request of several sequences (n, best_of, several prompts) interleaves its choices' chunks by ``index``.
- ``ErrorInfo`` / ``ServeError``: an error with its HTTP status and OpenAI body fields, raised where it
  arises (``ServeError``) and carried across a stream as an ``ErrorInfo`` item, never recognised by text.

Example:
    >>> req = GenerateRequest("req-1", prompt="def f():", params=SamplingParams(max_tokens=4))
    >>> ServeError(ErrorInfo(404, "no such model", code="model_not_found", param="model")).info.body()["error"]["code"]
    'model_not_found'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from parallel.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call of an assistant turn: ``arguments`` is JSON text, as OpenAI carries it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def for_template(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates read it: tool call arguments as objects (vLLM parses
        them the same way before rendering; text that is not JSON stays text)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                  "arguments": _json_or_text(c.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation, as the replica receives it. Exactly one of ``prompt`` and ``messages`` is set.

    ``fill_max_tokens``: the client gave no max_tokens (chat): the replica sets it to the room left in the
    context. ``deadline``: wall-clock (time.time()) after which the answer is no longer wanted.
    """

    request_id: str
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[ChatTurn, ...] | None = None
    prompts: tuple[str | tuple[int, ...], ...] = ()  # several prompts (completions): choices i * n + j
    params: SamplingParams = field(default_factory=SamplingParams)
    fill_max_tokens: bool = False
    deadline: float | None = None
    model: str = ""
    admitted_at: float | None = None  # time.time() when the ingress admitted it (the router's queue starts)
    traceparent: str | None = None  # W3C trace context of the ingress's span (tracing on)
    tools: str | None = None  # chat: the request's tools as JSON text, for the chat template (``tools=``)
    echo: bool = False  # return each prompt's text (and its logprobs with params.prompt_logprobs) first
    echo_only: bool = False  # max_tokens 0 with echo: the prompt alone (one token is computed, not returned)

    @property
    def fans_out(self) -> bool:
        """Several sequences (prompts x samples): the replica runs them as one request, choices indexed."""
        return bool(self.prompts) or self.params.num_sequences > 1


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """The delta a replica streams for one request; ``finish_reason`` is set on the last one."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # generated so far, including this chunk
    logprobs: tuple[TokenLogprob, ...] | None = None
    queue_s: float | None = None  # on the first chunk: time the request waited in the engine's queue
    index: int = 0  # the choice (prompt i, sample j -> i * n + j); counts above are the request's totals
    prompt_text: str | None = None  # echo: on a choice's first chunk
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # echo with logprobs: the first one's is NaN (none)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error's HTTP status and OpenAI body (``{"error": {"message", "type", "param", "code"}}``)."""

    status: int
    message: str
    type: str = ""
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()  # e.g. x-ratelimit-* on a 429

    def __post_init__(self) -> None:
        if not self.type:
            object.__setattr__(self, "type", "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        out = dict(self.extra_headers)
        if self.retry_after_s is not None:  # whole seconds rounded up: a client must not come back too early
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
            out["retry-after-ms"] = str(max(0, math.ceil(self.retry_after_s * 1000)))
        return out


class ServeError(Exception):
    """Raised where a request fails; the ingress turns it into a response with the info's status and body."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info

    def __reduce__(self):  # pickles with its info across Ray
        return (ServeError, (self.info,))


def invalid(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> ServeError:
    return ServeError(ErrorInfo(status, message, param=param, code=code))


def unavailable(message: str, code: str, retry_after_s: float) -> ServeError:
    return ServeError(ErrorInfo(503, message, code=code, retry_after_s=retry_after_s))


def as_request(request: GenerateRequest | dict[str, Any]) -> GenerateRequest:
    """A handle caller's dict (``{"prompt" | "prompts" | "messages", "params": {SamplingParams fields}}``, and
    optionally ``request_id``, ``fill_max_tokens``, ``deadline``, ``echo``) as the message.

    Example:
        >>> as_request({"prompts": ["a", [1, 2]], "params": {"n": 2}}).prompts
        ('a', (1, 2))
    """
    if isinstance(request, GenerateRequest):
        return request
    import uuid

    body = dict(request)
    params = SamplingParams(**(body.pop("params", None) or body.pop("sampling", None) or {}))
    messages = body.pop("messages", None)
    prompt = body.pop("prompt", None)
    return GenerateRequest(
        body.pop("request_id", None) or f"req-{uuid.uuid4().hex}",
        prompt=prompt if isinstance(prompt, str) or prompt is None else tuple(prompt),
        messages=tuple(ChatTurn(m["role"], m["content"]) for m in messages) if messages is not None else None,
        prompts=tuple(p if isinstance(p, str) else tuple(p) for p in body.pop("prompts", None) or ()),
        params=params, fill_max_tokens=body.pop("fill_max_tokens", False), deadline=body.pop("deadline", None),
        echo=bool(body.pop("echo", False)))
