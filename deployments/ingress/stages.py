"""The stages every request passes before a route sees it: plain async code over typed values.

    request id -> size and content-type limits -> authenticate -> read and parse the body (bounded)
    -> the key may use the model -> rate limit (reserve) -> (route)
    -> observe (``observe.py``: metrics, request log, drift; the reservation settled), once at the end

Stages know nothing of Ray or of where they run (the router deployment, or a model replica that serves
HTTP itself), so they are unit-tested alone. Authentication and rate limits are seams (``Authenticator``,
``RateLimiter``) whose defaults admit everything; ``deployments/gateway/`` holds the real ones (API keys,
leased cluster-wide limits). A stage refuses a request by raising ``ServeError``.

Example:
    >>> limits = Limits(max_body_bytes=1024)
    >>> asyncio.run(Pipeline(limits).admit(Incoming("POST", "/v1/completions", {"content-type": "text/plain"},
    ...                                             body_chunks([b"{}"]))))
    Traceback (most recent call last):
    ...
    deployments.messages.ServeError: content type 'text/plain' is not supported: send application/json
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from deployments.gateway.auth import check_model
from deployments.messages import ErrorInfo, ServeError, invalid

logger = logging.getLogger("ray.serve")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
JSON_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"})


@dataclass(frozen=True)
class Limits:
    """Bounds on what a request may carry (config: ``router.limits``)."""

    max_body_bytes: int = 4 << 20
    max_json_depth: int = 32
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class Incoming:
    """A request as it arrives: method, path (without the app's route prefix), lower-case headers, body."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: AsyncIterator[bytes] | None = None
    client: str | None = None


@dataclass(frozen=True)
class Admitted:
    """A request every stage has let through."""

    request_id: str
    route: str
    started: float  # time.time() at arrival
    deadline: float  # time.time() after which the answer is no longer wanted
    body: dict[str, Any] | None = None
    principal: Any = None  # who is calling: the key's gateway.keys.Grant (auth on), else None
    tags: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    outcome: Any = None  # observe.Outcome: what the request did, recorded when it ends


def request_id(headers: Mapping[str, str]) -> str:
    """The client's ``x-request-id`` when it is a sane token, else a fresh one."""
    given = headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else f"req-{uuid.uuid4().hex}"


def check_headers(method: str, path: str, headers: Mapping[str, str], limits: Limits) -> None:
    """413 for a declared body over the limit, 415 for a non-JSON body on a JSON route (before reading)."""
    if method != "POST" or path not in JSON_ROUTES:
        return
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise too_large(limits)
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise ServeError(ErrorInfo(415, f"content type {ctype or 'none'!r} is not supported: send application/json",
                                   code="unsupported_media_type"))


def too_large(limits: Limits) -> ServeError:
    return ServeError(ErrorInfo(413, f"request body is larger than {limits.max_body_bytes} bytes",
                                code="request_too_large"))


async def read_body(chunks: AsyncIterator[bytes], limits: Limits) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (a chunked body has no content-length)."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_large(limits)
        parts.append(chunk)
    return b"".join(parts)


def parse_json(raw: bytes, limits: Limits) -> dict[str, Any]:
    """A JSON object, nested at most ``max_json_depth`` deep (400 otherwise, never a RecursionError)."""
    if _max_depth(raw) > limits.max_json_depth:
        raise invalid(f"request body is nested deeper than {limits.max_json_depth} levels", code="invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid(f"request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object", code="invalid_json")
    return body


def _max_depth(raw: bytes) -> int:
    """Bracket depth outside strings, in C speed: strings stripped by the regex engine, depth as a
    cumulative sum (a Python loop per byte would take seconds on a few MiB)."""
    if raw.count(b"[") + raw.count(b"{") <= 8:
        return 8
    arr = np.frombuffer(re.sub(rb'"(?:[^"\\]|\\.)*"', b"", raw), dtype=np.uint8)
    step = (arr == ord("[")).astype(np.int32) + (arr == ord("{")) - (arr == ord("]")) - (arr == ord("}"))
    return int(step.cumsum().max(initial=0))


class Authenticator(Protocol):
    async def authenticate(self, request_id: str, headers: Mapping[str, str], route: str) -> Any:
        """The caller's identity (an object with ``key_id``), None for anonymous, or raise ServeError (401)."""
        ...


class RateLimiter(Protocol):
    async def admit(self, request: Admitted) -> Any:
        """A reservation (with ``headers``) settled when the request ends, None; or raise ServeError (429)."""
        ...

    def settle(self, reservation: Any, used_tokens: int) -> None:
        ...


class OpenAccess:
    """Authentication off: everyone is anonymous."""

    async def authenticate(self, request_id: str, headers: Mapping[str, str], route: str) -> Any:
        return None


class Unlimited:
    async def admit(self, request: Admitted) -> None:
        return None

    def settle(self, reservation: Any, used_tokens: int) -> None:
        return None


class Pipeline:
    """Runs the stages in order; ``admit`` returns the ``Admitted`` request or raises ``ServeError``."""

    def __init__(self, limits: Limits, auth: Authenticator | None = None,
                 rate_limiter: RateLimiter | None = None) -> None:
        self.limits = limits
        self.auth = auth or OpenAccess()
        self.rate_limiter = rate_limiter or Unlimited()

    async def admit(self, incoming: Incoming, rid: str | None = None, outcome: Any = None) -> Admitted:
        rid = rid or request_id(incoming.headers)
        now = time.time()
        check_headers(incoming.method, incoming.path, incoming.headers, self.limits)
        try:
            principal = await self.auth.authenticate(rid, incoming.headers, incoming.path)
        except ServeError as err:  # a refused key the secret proved (revoked, expired) is audited by its id
            if outcome is not None:
                outcome.principal = getattr(err, "key_id", None)
            raise
        if outcome is not None:
            outcome.principal = getattr(principal, "key_id", None)
        body = None
        if incoming.method == "POST" and incoming.path in JSON_ROUTES:
            raw = await read_body(incoming.body or body_chunks([]), self.limits)
            body = parse_json(raw, self.limits) if len(raw) < 65536 else await asyncio.to_thread(
                parse_json, raw, self.limits)  # a large body is parsed off the event loop
        if body is not None:
            check_model(principal, body.get("model"))
        admitted = Admitted(rid, incoming.path, now, now + self.limits.request_timeout_s, body, principal,
                            headers=incoming.headers, outcome=outcome)
        if outcome is not None:
            outcome.started = now
        reservation = await self.rate_limiter.admit(admitted)
        if reservation is not None and outcome is not None:
            outcome.response_headers.update(reservation.headers)
            limiter = self.rate_limiter
            outcome.settle = lambda: limiter.settle(reservation, outcome.prompt_tokens + outcome.completion_tokens)
        return admitted

    async def close(self) -> None:
        """Give back what the rate limiter holds (its leases) when this process stops serving."""
        close = getattr(self.rate_limiter, "close", None)
        if close is not None:
            try:
                await close()
            except Exception as err:  # the state is gone too: its leases expire with it
                logger.info("rate-limit leases not returned: %s", type(err).__name__)

    def for_handle(self, route: str, body: dict[str, Any], rid: str | None = None, outcome: Any = None) -> Admitted:
        """A Python caller (a DeploymentHandle): no HTTP stages, same request id and deadline."""
        now = time.time()
        return replace(Admitted(rid or f"req-{uuid.uuid4().hex}", route, now, now + self.limits.request_timeout_s),
                       body=body, outcome=outcome)


async def body_chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
