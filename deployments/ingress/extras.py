"""vLLM's extra routes beside OpenAI's: ``POST /tokenize`` and ``POST /detokenize``, bounded and strict.

``/tokenize`` takes a completion's ``prompt`` or a chat's ``messages`` and answers the token ids the model
would see (the chat rendered by the model's template, exactly as generation renders it), with vLLM's body
``{"count", "max_model_len", "tokens"}``; ``/detokenize`` takes ``tokens`` and answers ``{"prompt"}``. The
replica that serves the model does the work (``LLMServer.tokenize`` / ``detokenize``): one tokenizer.

Example:
    >>> model, req = tokenize_call("r1", {"model": "m", "prompt": "def f():"})
    >>> model, req.prompt
    ('m', 'def f():')
    >>> detokenize_call({"model": "m", "tokens": [1, 2]})
    ('m', [1, 2])
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.ingress.generate import REPLICA_GONE, CallPolicy
from deployments.ingress.protocol import MAX_MESSAGES, ChatMessage, Text, TokenIds
from deployments.ingress.routes import parse
from deployments.messages import ChatTurn, ErrorInfo, GenerateRequest, ServeError, unavailable

Model = Annotated[str, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizeCompletion(_Strict):
    model: Model
    prompt: Text | TokenIds
    add_special_tokens: Literal[True] | None = None  # the prompt as generation sees it: with its BOS


class TokenizeChat(_Strict):
    model: Model
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: Literal[True] | None = None  # as a chat completion renders it
    add_special_tokens: Literal[False] | None = None  # the template writes them


class DetokenizeRequest(_Strict):
    model: Model
    tokens: TokenIds


def tokenize_call(request_id: str, body: dict[str, Any]) -> tuple[str, GenerateRequest]:
    """The model named and the request the replica tokenizes (a 400 naming the field when invalid)."""
    if "messages" in body:
        chat: TokenizeChat = parse(TokenizeChat, body)
        turns = tuple(ChatTurn(m.role, m.text()) for m in chat.messages)
        return chat.model, GenerateRequest(request_id, messages=turns, model=chat.model)
    req: TokenizeCompletion = parse(TokenizeCompletion, body)
    prompt = req.prompt if isinstance(req.prompt, str) else tuple(req.prompt)
    return req.model, GenerateRequest(request_id, prompt=prompt, model=req.model)


def detokenize_call(body: dict[str, Any]) -> tuple[str, list[int]]:
    req: DetokenizeRequest = parse(DetokenizeRequest, body)
    return req.model, list(req.tokens)


async def ask_replica(handle: Any, model: str, policy: CallPolicy, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """One call to a replica of ``model`` (``call(handle)``): its answer, or the error it answered as a
    ServeError, or a 503 when no replica answered in time."""
    from ray.serve.exceptions import BackPressureError

    try:
        result = await asyncio.wait_for(call(handle), timeout=policy.cold_start_timeout_s)
    except (BackPressureError, TimeoutError, *REPLICA_GONE) as err:
        raise unavailable(f"model {model!r} did not answer ({type(err).__name__}); retry", "unavailable",
                          policy.retry_after_s) from err
    if isinstance(result, ErrorInfo):
        raise ServeError(result)
    return result
