"""OpenTelemetry spans for ingress -> replica -> engine, off unless configured; the one seam around the SDK.

``setup(config)`` once per process: with no ``otlp_endpoint`` (the default) nothing is installed and every call
is a no-op of well under a microsecond. Spans go through a ``TracerProvider`` owned here, never the global one
(Ray or vLLM may have set that). The ingress's ``request_span`` continues a client's W3C ``traceparent`` when
valid; anything else (garbage, version ff, zero ids, an oversized header) starts a new trace, never raises.
Processes pass one plain string: ``span.traceparent`` / ``current_traceparent()`` on one side, ``child_span``
and ``record_phases`` (the engine's queued / prefill / decode, timed by ``time.monotonic()``) on the other.
``tracestate`` is dropped: nothing here reads it, and the typed messages carry one bounded string.

Sampling is ``ParentBased(TraceIdRatioBased(sample_ratio))``, but the client's sampled flag is not trusted: the
ingress continues the trace id with its own draw, so a client can neither force recording past the ratio nor
turn it off; replica and engine follow the ingress's flag. Privacy: no prompt or completion text in a span.
Keys naming content (any dotted segment in ``_CONTENT_SEGMENTS``: ``gen_ai.prompt``, ``gen_ai.input.messages``,
...) are dropped, exception messages never recorded (they may quote the input), strings cut at 256 characters.

Example:
    >>> tracer = setup(TracingConfig())  # no endpoint: off, nothing installed
    >>> with request_span("POST /v1/completions", None, {HTTP_REQUEST_METHOD: "POST"}) as span:
    ...     span.set_status(200)
    >>> current_traceparent() is None and span.traceparent is None
    True
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Final, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from deployments.tracing_attributes import (  # noqa: F401  (re-exported: callers name them tracing.X)
    CANCELLED,
    ERROR_TYPE,
    GEN_AI_OPERATION_NAME,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_REQUEST_STREAM,
    GEN_AI_REQUEST_TEMPERATURE,
    GEN_AI_REQUEST_TOP_P,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
    MAX_ATTRIBUTES,
    MAX_NAME,
    MAX_STRING,
    REQUEST_ID,
    allowed_key,
    clean,
    clean_string,
    clean_value,
    parse_traceparent,
)
from deployments.tracing_config import Protocol, TracingConfig, otlp_exporter, redacted  # noqa: F401

_log = logging.getLogger(__name__)


class Phase(NamedTuple):
    """One finished stretch of a request in the engine. A float time is ``time.monotonic()`` seconds (what
    the engine measures), an int is epoch nanoseconds (``time.time_ns()``). A None time skips the phase."""

    name: str
    start: float | int | None
    end: float | int | None
    attributes: Mapping[str, object] | None = None


def _offset_ns() -> int:
    before = time.time_ns()
    mono = time.monotonic_ns()
    return (before + time.time_ns()) // 2 - mono


# Taken once: monotonic stamps are immune to wall-clock steps, and one fixed offset keeps every duration
# exactly as measured and phases in order, where reading time.time() per conversion would let an NTP step
# stretch, shrink or reorder them. CLOCK_MONOTONIC is system-wide, so stamps from the engine process convert
# correctly here; a step of the wall clock after start shifts spans (not durations) until the process restarts.
_EPOCH_OFFSET_NS: Final = _offset_ns()


def monotonic_to_epoch_ns(t: float) -> int:
    """A ``time.monotonic()`` reading (this host, any process) as epoch nanoseconds, as spans want them."""
    return _EPOCH_OFFSET_NS + round(t * 1e9)


def context_from(traceparent: str | None) -> Context:
    """The OpenTelemetry context of a W3C ``traceparent``; an empty context (a new trace) for anything
    missing or malformed. Never raises."""
    parsed = parse_traceparent(traceparent)
    return Context() if parsed is None else _remote(*parsed)


def _remote(trace_id: int, span_id: int, flags: int) -> Context:
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


class SpanHandle:
    """What ``request_span`` / ``child_span`` return, a context manager. This base is the no-op one given
    while tracing is off: every method returns at once. (An unsampled span is a live one recording nothing.)

    Example:
        >>> with child_span("replica.generate", None) as span:
        ...     span.set_attributes({GEN_AI_USAGE_OUTPUT_TOKENS: 12, GEN_AI_RESPONSE_FINISH_REASONS: ["stop"]})
        >>> span.recording, span.traceparent
        (False, None)
    """

    __slots__ = ()
    recording: bool = False

    @property
    def traceparent(self) -> str | None:
        """This span's W3C traceparent, for another process (None when tracing is off)."""
        return None

    def set_attribute(self, key: str, value: object) -> None:
        """Set one attribute. Content keys are dropped, strings cut at 256; values other than str, bool,
        int, float and flat sequences of one of them are dropped."""

    def set_attributes(self, attributes: Mapping[str, object]) -> None:
        """``set_attribute`` for each item."""

    def set_status(self, status_code: int) -> None:
        """Record the HTTP status answered. 5xx marks the span an error (``error.type`` = the code); 4xx
        does not (the OpenTelemetry HTTP server convention). An exception escaping afterwards keeps it."""

    def set_error(self, error_type: str) -> None:
        """Mark the span failed with a short, low-cardinality ``error.type`` (never a message)."""

    def __enter__(self) -> SpanHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


_NOOP_SPAN: Final = SpanHandle()


class _LiveSpan(SpanHandle):
    """Started when created; made current (``activate``) from enter to exit; ended at exit."""

    __slots__ = ("_activate", "_span", "_status_set", "_token", "recording")

    def __init__(self, tracer: trace.Tracer, name: str, context: Context | None, kind: SpanKind,
                 attributes: Mapping[str, object] | None, activate: bool) -> None:
        # record_exception off: an exception's message and traceback may quote the prompt.
        self._span = tracer.start_span(clean_string(str(name), MAX_NAME), context=context, kind=kind,
                                       attributes=clean(attributes) if attributes else None,
                                       record_exception=False, set_status_on_exception=False)
        self.recording = self._span.is_recording()
        self._activate, self._token, self._status_set = activate, None, False

    @property
    def traceparent(self) -> str | None:
        return _format(self._span.get_span_context())

    def set_attribute(self, key: str, value: object) -> None:
        if self.recording and allowed_key(key) and (cleaned := clean_value(value)) is not None:
            self._span.set_attribute(key, cleaned)  # type: ignore[arg-type]

    def set_attributes(self, attributes: Mapping[str, object]) -> None:
        if self.recording:
            self._span.set_attributes(clean(attributes))  # type: ignore[arg-type]

    def set_status(self, status_code: int) -> None:
        if self.recording:
            code = int(status_code)
            self._status_set = True
            self._span.set_attribute(HTTP_RESPONSE_STATUS_CODE, code)
            if code >= 500:
                self._span.set_attribute(ERROR_TYPE, str(code))
                self._span.set_status(Status(StatusCode.ERROR, f"HTTP {code}"))

    def set_error(self, error_type: str) -> None:
        if self.recording:
            self._status_set = True
            error_type = clean_string(str(error_type), MAX_NAME)
            self._span.set_attribute(ERROR_TYPE, error_type)
            self._span.set_status(Status(StatusCode.ERROR, error_type))

    def __enter__(self) -> SpanHandle:
        if self._activate:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is not None and self.recording:
                if isinstance(exc, GeneratorExit | asyncio.CancelledError):
                    self._span.set_attribute(CANCELLED, True)  # the client went away: not a server error
                elif not self._status_set:
                    self.set_error(type(exc).__qualname__)
        finally:
            self._span.end()
            token, self._token = self._token, None
            if isinstance(token, contextvars.Token):
                # A streamed generator may be closed from another task (another contextvars.Context), where
                # resetting raises; that context is discarded anyway, and otel's detach would log a traceback.
                with contextlib.suppress(ValueError, RuntimeError):
                    token.var.reset(token)
            elif token is not None:
                otel_context.detach(token)  # a runtime context other than contextvars


class Tracing:
    """The process's tracer (one: ``setup`` installs into it, ``shutdown`` empties it); off, every call a
    no-op, until installed. The module functions of the same names are its bound methods.

    Example:
        >>> off = Tracing()
        >>> off.enabled, off.request_span("POST /v1/chat/completions", "00-garbage") is off.child_span("x", None)
        (False, True)
    """

    def __init__(self) -> None:
        self.config = TracingConfig()
        self.provider: TracerProvider | None = None
        self.exporter: SpanExporter | None = None
        self._tracer: trace.Tracer | None = None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def request_span(self, name: str, traceparent: str | None = None,
                     attributes: Mapping[str, object] | None = None, *, activate: bool = True) -> SpanHandle:
        """A SERVER span for one HTTP request, continuing the client's ``traceparent`` when valid, a new trace
        otherwise. ``activate``: current from enter to exit (``current_traceparent`` sees it). Pass False when
        it ends in another task (a streamed body) and hand on ``span.traceparent`` explicitly."""
        tracer = self._tracer
        if tracer is None:
            return _NOOP_SPAN
        parsed = parse_traceparent(traceparent)
        if parsed is None:
            context = Context()  # a root: the ingress is where this service's part of a trace begins
        else:
            ratio = self.config.sample_ratio
            sampled = ratio >= 1.0 or random.random() < ratio  # our draw, not the client's flag
            context = _remote(parsed[0], parsed[1], TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        return _LiveSpan(tracer, name, context, SpanKind.SERVER, attributes, activate)

    def child_span(self, name: str, parent_traceparent: str | None,
                   attributes: Mapping[str, object] | None = None, *, activate: bool = True) -> SpanHandle:
        """An INTERNAL span, child of ``parent_traceparent`` (from another process); with None or a malformed
        one, child of the current span, or a new trace."""
        tracer = self._tracer
        if tracer is None:
            return _NOOP_SPAN
        parsed = parse_traceparent(parent_traceparent)
        return _LiveSpan(tracer, name, None if parsed is None else _remote(*parsed), SpanKind.INTERNAL, attributes,
                         activate)

    def record_phases(self, parent_traceparent: str | None, phases: Sequence[Phase | tuple[object, ...]]) -> None:
        """Emit finished spans with the given times, in the given order, children of ``parent_traceparent``.
        Nothing without a valid, sampled parent (root spans with no request above them would be noise). A
        phase with a missing, implausible or backwards time, or malformed, is skipped: a bug in timing must
        not fail the request it times."""
        tracer = self._tracer
        parsed = parse_traceparent(parent_traceparent) if tracer is not None else None
        if tracer is None or parsed is None or not parsed[2] & TraceFlags.SAMPLED:
            return
        context = _remote(*parsed)
        for phase in phases:
            try:
                name, start, end, attributes = Phase(*phase)  # type: ignore[arg-type]
            except TypeError:
                continue
            start_ns, end_ns = _epoch_ns(start), _epoch_ns(end)
            if start_ns is None or end_ns is None or end_ns < start_ns:
                continue
            span = tracer.start_span(clean_string(str(name), MAX_NAME), context=context, start_time=start_ns,
                                     attributes=clean(attributes) if attributes else None)  # type: ignore[arg-type]
            span.end(end_time=end_ns)

    def current_traceparent(self) -> str | None:
        """The W3C traceparent of the current span (of any provider), or None (off, or none current)."""
        return None if self._tracer is None else _format(trace.get_current_span().get_span_context())

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export what has ended; True when done in time."""
        provider = self.provider
        return True if provider is None else provider.force_flush(int(timeout_s * 1000))

    def _install(self, config: TracingConfig, provider: TracerProvider, exporter: SpanExporter) -> None:
        self.config, self.provider, self.exporter = config, provider, exporter
        self._tracer = provider.get_tracer("modelfleet")  # last: request_span reads config once this is set

    def _uninstall(self) -> TracerProvider | None:
        provider, self._tracer, self.provider, self.exporter = self.provider, None, None, None
        self.config = TracingConfig()
        return provider


_TRACING: Final = Tracing()
_lock = threading.Lock()


def setup(config: TracingConfig | None = None, exporter: SpanExporter | None = None) -> Tracing:
    """Install tracing for this process and return the process's ``Tracing``; idempotent. Off (nothing
    installed) when ``config`` has no endpoint and no ``exporter`` is given. An ``exporter`` (tests:
    ``InMemorySpanExporter``) is used synchronously in place of OTLP; otherwise a background thread batches
    spans to the endpoint, dropping them, never blocking, when the collector falls behind. Once installed, a
    call asking for something else is logged and ignored (``shutdown()`` first to change it)."""
    config = config or TracingConfig()
    with _lock:
        if _TRACING.enabled:
            if config != _TRACING.config or (exporter is not None and exporter is not _TRACING.exporter):
                _log.warning("tracing is already set up in this process; keeping the first configuration")
            return _TRACING
        if config.otlp_endpoint is None and exporter is None:
            return _TRACING
        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=Resource.create({SERVICE_NAME: config.service_name}),
            span_limits=SpanLimits(max_span_attributes=MAX_ATTRIBUTES, max_span_attribute_length=MAX_STRING))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            exporter = otlp_exporter(config)
            provider.add_span_processor(BatchSpanProcessor(exporter))
            _log.info("tracing: spans go over OTLP %s to %s (sample ratio %g)", config.protocol,
                      redacted(config.otlp_endpoint or ""), config.sample_ratio)
        _TRACING._install(config, provider, exporter)
        return _TRACING


def shutdown() -> None:
    """Flush, stop exporting and uninstall (a replica's drain; tests); a later ``setup`` installs afresh."""
    with _lock:
        provider = _TRACING._uninstall()
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    """Whether spans are recorded: lets a caller skip building attributes when off."""
    return _TRACING.enabled


# Bound once: ``from deployments.tracing import request_span`` stays right across setup and shutdown.
request_span = _TRACING.request_span
child_span = _TRACING.child_span
record_phases = _TRACING.record_phases
current_traceparent = _TRACING.current_traceparent
flush = _TRACING.flush


def _format(span_context: SpanContext) -> str | None:
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def _epoch_ns(t: object) -> int | None:
    # Guards against the other clock: an int below 2001 in epoch ns is monotonic_ns; a float above 31 years
    # of uptime is time.time(). Such a phase would be drawn decades away, so it is skipped instead.
    if isinstance(t, bool):
        return None
    if isinstance(t, int):
        return t if t >= 10**18 else None
    if isinstance(t, float) and 0.0 <= t < 1e9:
        return monotonic_to_epoch_ns(t)
    return None


