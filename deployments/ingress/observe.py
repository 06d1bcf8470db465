"""The pipeline's last stage: what one request did, recorded once when it ends (metrics, request log, drift).

An ``Outcome`` is opened when a request arrives and filled as it goes (model once resolved, chunks as they
pass, the error if one ends it); ``RequestObserver.end`` records it exactly once, whichever way the request
ended: a JSON answer, a stream that finished or failed mid-way, a client that left, a stream dropped before
it started. Labels only carry bounded values: the model label is set only after the model resolved to a
configured one (a hostile ``model`` field never becomes a series), the reason is an OpenAI error code.

Example:
    >>> obs = RequestObserver("router")
    >>> out = obs.begin("r1", "/v1/completions")
    >>> out.model = "m"; out.chunk(Chunk("ab", (1, 2), "length", 3, 2), now=out.started + 0.1)
    >>> obs.end(out, 200); obs.end(out, 200)  # once only
    >>> out.record()["completion_tokens"], round(out.record()["ttft_s"], 3)
    (2, 0.1)
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments import tracing
from deployments.ingress.routes import Stream
from deployments.messages import Chunk, ErrorInfo
from deployments.metrics import IN_FLIGHT, REJECTIONS, REQUESTS
from deployments.request_log import RequestLog

logger = logging.getLogger("ray.serve")
PREFLIGHT = "preflight"  # the route label of a CORS preflight (OPTIONS): answered, never recorded
UNOBSERVED = frozenset({"/health", "/metrics", PREFLIGHT})


@dataclass
class Outcome:
    """One request's record, filled as it goes (mutable: one owner, the request's own task)."""

    request_id: str
    route: str
    ingress: str
    started: float = field(default_factory=time.time)
    model: str = ""  # set only once the model resolved (bounded label values)
    version: str = ""
    principal: str | None = None  # the key's id once authentication exists, never the key
    streaming: bool = False  # a stream response started: the stream's end records it
    status: int = 200
    code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_at: float | None = None
    queue_s: float | None = None
    prompt: Any = None  # content as sent, kept only when the privacy mode wants it
    completion: list[str] | None = None
    ended: bool = False
    span: Any = None  # tracing.SpanHandle of the request (a no-op when tracing is off)
    response_headers: dict[str, str] = field(default_factory=dict)  # e.g. x-ratelimit-*, on every response
    settle: Callable[[], None] | None = None  # the rate-limit reservation, settled with the tokens used

    @property
    def traceparent(self) -> str | None:
        """What the replica continues the trace from (None with tracing off)."""
        return self.span.traceparent if self.span is not None else None

    def chunk(self, c: Chunk, now: float | None = None) -> None:
        if self.first_at is None:
            self.first_at = now if now is not None else time.time()
            if c.queue_s is not None:
                self.queue_s = c.queue_s
        self.prompt_tokens, self.completion_tokens = c.prompt_tokens, c.completion_tokens
        if c.finish_reason is not None:
            self.finish_reason = c.finish_reason
        if self.completion is not None:
            self.completion.append(c.text)

    def fail(self, info: ErrorInfo) -> None:
        self.status, self.code = info.status, info.code or ("error" if info.status >= 500 else "invalid_request")

    def record(self, now: float | None = None) -> dict[str, Any]:
        now = now if now is not None else time.time()
        return {"ts": round(now, 6), "request_id": self.request_id, "model": self.model or None,
                "version": self.version or None, "route": self.route, "ingress": self.ingress,
                "status": self.status, "code": self.code, "stream": self.streaming,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "queue_s": _round(self.queue_s),
                "ttft_s": _round(self.first_at - self.started if self.first_at is not None else None),
                "e2e_s": _round(now - self.started), "finish_reason": self.finish_reason,
                "key_id": self.principal}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def prompt_content(body: dict[str, Any] | None) -> Any:
    """The prompt as sent (a string, token ids, or the chat messages): encoded off the event loop, by the
    request log's writer thread, and only in its hashed/full modes."""
    if not body:
        return None
    return body["messages"] if "messages" in body else body.get("prompt")


class RequestObserver:
    """Records ended requests: ``modelfleet_requests_total`` and rejections, in-flight streams, the request
    log (``log``), drift counts (``drift``, a ``deployments.drift.DriftRecorder``)."""

    def __init__(self, ingress: str, log: RequestLog | None = None, drift: Any = None, version: str = "") -> None:
        self.ingress, self.log, self.drift, self.version = ingress, log, drift, version

    def begin(self, request_id: str, route: str, method: str = "POST", traceparent: str | None = None) -> Outcome:
        out = Outcome(request_id, route, self.ingress, version=self.version)
        if self.log is not None and self.log.wants_content:
            out.completion = []
        if tracing.enabled():  # the span ends in end(), maybe in another task (a stream): not made current
            out.span = tracing.request_span(f"{method} {route}", traceparent, {
                tracing.HTTP_REQUEST_METHOD: method, tracing.HTTP_ROUTE: route, tracing.REQUEST_ID: request_id},
                activate=False).__enter__()
        return out

    def with_body(self, out: Outcome, body: dict[str, Any] | None) -> None:
        if self.log is not None and self.log.wants_content:
            out.prompt = prompt_content(body)

    def stream_started(self, out: Outcome) -> None:
        out.streaming = True
        IN_FLIGHT.labels(out.model, self.ingress).inc()

    def watch(self, stream: Stream, out: Outcome) -> Stream:
        """``stream`` with every chunk recorded into ``out`` (a mid-stream error too)."""
        return _Watched(stream, out)

    def end(self, out: Outcome, status: int | None = None) -> None:
        if out.ended:
            return
        out.ended = True
        if out.settle is not None:
            try:
                out.settle()
            except Exception:  # never fail an answered request; the lease sweep corrects the rest
                logger.exception("settling the rate limit of request %s failed", out.request_id)
        if out.route in UNOBSERVED:  # probes and scrapes: not traffic (they would skew the error ratio)
            if out.span is not None:
                out.span.__exit__(None, None, None)
            return
        if status is not None and out.code is None:
            out.status = status
        try:
            REQUESTS.labels(out.model, out.route, str(out.status), self.ingress).inc()
            if out.status >= 400:
                REJECTIONS.labels(out.model, out.code or str(out.status)).inc()
            if out.streaming:
                IN_FLIGHT.labels(out.model, self.ingress).dec()
            if self.drift is not None and out.model and out.status < 400 and out.first_at is not None:
                self.drift.observe(out.model, out.version, out.prompt_tokens, out.completion_tokens,
                                   out.finish_reason)
            if self.log is not None:
                completion = "".join(out.completion) if out.completion is not None else None
                self.log.write(out.record(), prompt=out.prompt, completion=completion)
            if out.span is not None:
                out.span.set_attributes({tracing.GEN_AI_REQUEST_MODEL: out.model or None,
                                         tracing.GEN_AI_USAGE_INPUT_TOKENS: out.prompt_tokens,
                                         tracing.GEN_AI_USAGE_OUTPUT_TOKENS: out.completion_tokens,
                                         tracing.GEN_AI_RESPONSE_FINISH_REASONS: [out.finish_reason or ""]})
                out.span.set_status(out.status)
                out.span.__exit__(None, None, None)
        except Exception:  # recording must never fail a request that was answered
            logger.exception("recording request %s failed", out.request_id)


class _Watched:
    def __init__(self, stream: Stream, out: Outcome) -> None:
        self._stream, self._out = stream, out
        self.first = stream.first
        if stream.first is not None:
            out.chunk(stream.first)

    async def rest(self) -> AsyncIterator[Chunk | ErrorInfo]:
        out = self._out
        async for item in self._stream.rest():
            if isinstance(item, ErrorInfo):
                out.fail(item)
            else:
                out.chunk(item)
            yield item

    def cancel(self) -> None:
        self._stream.cancel()
