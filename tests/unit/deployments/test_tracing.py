"""Tracing: off by default and cheap; client traceparents continued, hostile ones ignored; the context crosses
a process boundary as one string; engine phases; errors; privacy and bounds; a real OTLP export (HTTP, gRPC).

The real SDK throughout, an in-memory exporter, and for the export path a collector on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from deployments import tracing
from deployments.tracing import (
    CANCELLED,
    ERROR_TYPE,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
    REQUEST_ID,
    Phase,
    TracingConfig,
    monotonic_to_epoch_ns,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
VALID = f"00-{TRACE}-{PARENT}-01"
ROUTE = "POST /v1/chat/completions"
_PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "grpc_proxy")


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    tracing.shutdown()
    yield
    tracing.shutdown()


@pytest.fixture
def exported() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    assert tracing.setup(TracingConfig(), exporter=exporter).enabled
    return exporter


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARS:  # a proxy from the environment must not swallow the loopback collector's traffic
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _one(exporter: InMemorySpanExporter, name: str):
    (span,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


# -- off by default ---------------------------------------------------------------------------------------


def test_off_by_default_installs_nothing_records_nothing_and_costs_little(monkeypatch):
    def no_provider(*args, **kwargs):
        raise AssertionError("tracing off must not build a TracerProvider")

    monkeypatch.setattr(tracing, "TracerProvider", no_provider)
    global_provider = trace.get_tracer_provider()
    t = tracing.setup(TracingConfig())
    assert t is tracing.setup() and not t.enabled and not tracing.enabled()
    assert TracingConfig(otlp_endpoint="  ").otlp_endpoint is None  # blank (an unset env var) is off too
    with tracing.request_span(ROUTE, VALID, {HTTP_REQUEST_METHOD: "POST"}) as span:
        assert tracing.current_traceparent() is None
        span.set_attribute(GEN_AI_REQUEST_MODEL, "m")
        span.set_status(503)
    assert span.traceparent is None and not span.recording
    with tracing.child_span("replica.generate", VALID) as child:
        assert child.traceparent is None
    tracing.record_phases(VALID, [("queued", 1.0, 2.0)])
    assert tracing.flush() and trace.get_tracer_provider() is global_provider

    # Off, a span is one shared no-op object: nothing is allocated or recorded per request (measured with
    # timeit: ~0.2 µs per request span; tests assert no wall-clock figure).
    attributes = {HTTP_REQUEST_METHOD: "POST", HTTP_ROUTE: "/v1/chat/completions"}
    assert tracing.request_span(ROUTE, VALID, attributes) is tracing.child_span("x", VALID)


# -- the ingress: a client's traceparent --------------------------------------------------------------------


def test_a_valid_client_traceparent_is_continued(exported):
    attrs = {HTTP_REQUEST_METHOD: "POST", HTTP_ROUTE: "/v1/chat/completions", GEN_AI_REQUEST_MODEL: "llama",
             GEN_AI_REQUEST_MAX_TOKENS: 16}
    with tracing.request_span(ROUTE, VALID, attrs) as span:
        inner = tracing.current_traceparent()
        span.set_status(200)
    assert tracing.current_traceparent() is None  # no longer current after exit
    s = _one(exported, ROUTE)
    assert s.context.trace_id == int(TRACE, 16) and s.kind is SpanKind.SERVER
    assert s.parent is not None and s.parent.span_id == int(PARENT, 16) and s.parent.is_remote
    assert inner == span.traceparent == f"00-{TRACE}-{s.context.span_id:016x}-01"
    assert s.attributes[GEN_AI_REQUEST_MODEL] == "llama" and s.attributes[GEN_AI_REQUEST_MAX_TOKENS] == 16
    assert s.attributes[HTTP_RESPONSE_STATUS_CODE] == 200 and s.status.status_code is StatusCode.UNSET
    assert s.resource.attributes["service.name"] == "modelfleet"


def test_a_later_version_with_an_extra_field_is_continued(exported):
    with tracing.request_span(ROUTE, f" 01-{TRACE}-{PARENT}-01-future\t"):
        pass
    s = _one(exported, ROUTE)
    assert s.context.trace_id == int(TRACE, 16) and s.parent.span_id == int(PARENT, 16)


def test_the_client_sampled_flag_is_not_trusted(exported):
    with tracing.request_span(ROUTE, f"00-{TRACE}-{PARENT}-00") as span:  # a client not sampling this one
        pass
    assert span.recording and _one(exported, ROUTE).context.trace_id == int(TRACE, 16)
    assert span.traceparent.endswith("-01")  # ... is recorded at ratio 1, and downstream follows us


def test_ratio_zero_records_nothing_and_downstream_follows():
    exporter = InMemorySpanExporter()
    tracing.setup(TracingConfig(sample_ratio=0.0), exporter=exporter)
    with tracing.request_span(ROUTE, VALID) as ingress:  # the client asked for sampling: refused
        tp = tracing.current_traceparent()
    assert not ingress.recording and tp is not None and tp.startswith(f"00-{TRACE}-") and tp.endswith("-00")
    with tracing.child_span("replica.generate", tp) as replica:
        tracing.record_phases(replica.traceparent, [("queued", 1.0, 2.0)])
    assert not replica.recording and exporter.get_finished_spans() == ()


BAD_TRACEPARENTS = {
    "garbage": "garbage",
    "empty": "",
    "version ff": f"ff-{TRACE}-{PARENT}-01",
    "all-zero trace id": f"00-{'0' * 32}-{PARENT}-01",
    "all-zero span id": f"00-{TRACE}-{'0' * 16}-01",
    "uppercase hex": f"00-{TRACE.upper()}-{PARENT}-01",
    "non-hex": f"00-{TRACE[:-1]}g-{PARENT}-01",
    "short trace id": f"00-{TRACE[:-1]}-{PARENT}-01",
    "version 00 with a field more": f"{VALID}-extra",
    "a later version glued on": f"01-{TRACE}-{PARENT}-01x",
    "newline": f"{VALID}\n",
    "10 KB": "00-" + "a" * 10_000,
    "10 KB behind a valid head": f"01-{TRACE}-{PARENT}-01-" + "x" * 10_000,
    "bytes": VALID.encode(),
    "int": 12345,
}


@pytest.mark.parametrize("bad", BAD_TRACEPARENTS.values(), ids=BAD_TRACEPARENTS.keys())
def test_a_malformed_traceparent_starts_a_new_trace(exported, bad):
    assert not trace.get_current_span(tracing.context_from(bad)).get_span_context().is_valid
    with tracing.request_span(ROUTE, bad) as span:
        assert span.recording
    s = _one(exported, ROUTE)
    assert s.parent is None and s.context.trace_id != int(TRACE, 16)
    with tracing.child_span("replica.generate", bad):  # nothing current: a new trace too
        pass
    assert _one(exported, "replica.generate").parent is None


# -- across a process boundary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Message:  # stands for GenerateRequest: frozen, pickled by Ray between the ingress and the replica
    request_id: str
    traceparent: str | None


def test_the_traceparent_crosses_a_process_boundary_as_a_string(exported):
    with tracing.request_span(ROUTE, VALID) as ingress:
        wire = pickle.dumps(_Message("req-1", tracing.current_traceparent()))
    assert pickle.loads(wire).traceparent == ingress.traceparent

    def replica() -> None:  # a fresh contextvars.Context: nothing is current, only the string came across
        message = pickle.loads(wire)
        assert tracing.current_traceparent() is None
        with (tracing.child_span("replica.generate", message.traceparent, {REQUEST_ID: message.request_id}),
              tracing.child_span("replica.detokenize", None)):  # None: child of the current span
            pass

    contextvars.Context().run(replica)
    i, r, d = _one(exported, ROUTE), _one(exported, "replica.generate"), _one(exported, "replica.detokenize")
    assert r.context.trace_id == i.context.trace_id == d.context.trace_id == int(TRACE, 16)
    assert r.parent.span_id == i.context.span_id and r.parent.is_remote and r.kind is SpanKind.INTERNAL
    assert d.parent.span_id == r.context.span_id and not d.parent.is_remote
    assert r.attributes[REQUEST_ID] == "req-1"


def test_spans_use_the_module_provider_not_the_global_one(monkeypatch, exported):
    theirs = InMemorySpanExporter()  # as if Ray or vLLM had installed a global provider
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(theirs))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    with trace.get_tracer("vllm").start_as_current_span("theirs") as outer:
        with tracing.child_span("replica.generate", None):  # nests under their current span, exports to ours
            pass
        with tracing.request_span(ROUTE, None):  # the ingress always starts our part of the trace
            pass
    assert [s.name for s in theirs.get_finished_spans()] == ["theirs"]
    assert _one(exported, "replica.generate").parent.span_id == outer.get_span_context().span_id
    assert _one(exported, ROUTE).parent is None


# -- the engine's phases --------------------------------------------------------------------------------------


def test_monotonic_to_epoch_ns_is_now_and_keeps_durations():
    assert abs(monotonic_to_epoch_ns(time.monotonic()) - time.time_ns()) < 50_000_000
    assert monotonic_to_epoch_ns(1000.25) - monotonic_to_epoch_ns(1000.0) == 250_000_000


def test_record_phases_emits_finished_children_with_the_given_times_in_order(exported):
    t0 = time.monotonic()
    phases = [("queued", t0, t0 + 0.004), Phase("prefill", t0 + 0.004, t0 + 0.010, {GEN_AI_USAGE_INPUT_TOKENS: 12}),
              ("decode", t0 + 0.010, t0 + 0.250)]
    with tracing.request_span(ROUTE, VALID) as ingress:
        parent = ingress.traceparent
    with tracing.child_span("replica.generate", parent) as replica:
        tracing.record_phases(replica.traceparent, phases)
    spans = [s for s in exported.get_finished_spans() if s.name in ("queued", "prefill", "decode")]
    assert [s.name for s in spans] == ["queued", "prefill", "decode"]
    r = _one(exported, "replica.generate")
    for span, (_, start, end, *_) in zip(spans, phases, strict=True):
        assert (span.start_time, span.end_time) == (monotonic_to_epoch_ns(start), monotonic_to_epoch_ns(end))
        assert span.parent.span_id == r.context.span_id and span.context.trace_id == int(TRACE, 16)
    assert spans[1].attributes[GEN_AI_USAGE_INPUT_TOKENS] == 12
    assert spans[0].end_time == spans[1].start_time  # one offset: contiguous phases stay contiguous


def test_record_phases_takes_epoch_ns_and_skips_what_it_cannot_place(exported):
    now_ns, t0 = time.time_ns(), time.monotonic()
    tracing.record_phases(VALID, [
        ("epoch", now_ns, now_ns + 1_000),
        ("unfinished", t0, None),  # aborted before it ended
        ("backwards", t0 + 1.0, t0),
        ("monotonic_ns", time.monotonic_ns(), time.monotonic_ns() + 1),  # the other clock: would be 1970
        ("wall seconds", time.time(), time.time() + 1.0),  # ditto, decades ahead
        ("malformed",),
        ("decode", t0, t0 + 0.5),
    ])
    assert [s.name for s in exported.get_finished_spans()] == ["epoch", "decode"]
    epoch = _one(exported, "epoch")
    assert (epoch.start_time, epoch.end_time) == (now_ns, now_ns + 1_000)
    assert epoch.parent.span_id == int(PARENT, 16)
    tracing.record_phases(None, [("queued", t0, t0 + 1.0)])  # no parent: nothing, not three root spans
    tracing.record_phases("garbage", [("queued", t0, t0 + 1.0)])
    assert len(exported.get_finished_spans()) == 2


# -- errors -------------------------------------------------------------------------------------------------


def test_a_5xx_status_is_an_error_a_4xx_is_not(exported):
    with tracing.request_span("POST /a", VALID) as span:
        span.set_status(503)
    with tracing.request_span("POST /b", VALID) as span:
        span.set_status(404)
    a, b = _one(exported, "POST /a"), _one(exported, "POST /b")
    assert a.status.status_code is StatusCode.ERROR and a.status.description == "HTTP 503"
    assert a.attributes[HTTP_RESPONSE_STATUS_CODE] == 503 and a.attributes[ERROR_TYPE] == "503"
    assert b.status.status_code is StatusCode.UNSET and b.attributes[HTTP_RESPONSE_STATUS_CODE] == 404
    assert ERROR_TYPE not in b.attributes


def test_an_escaping_exception_is_recorded_by_type_never_by_message(exported):
    with pytest.raises(RuntimeError), tracing.request_span(ROUTE, VALID):
        raise RuntimeError("prompt was: my secret text")
    s = _one(exported, ROUTE)
    assert s.status.status_code is StatusCode.ERROR and s.attributes[ERROR_TYPE] == "RuntimeError"
    assert not s.events and "secret" not in s.to_json()
    with pytest.raises(ValueError), tracing.child_span("replica.generate", VALID) as child:
        child.set_status(400)  # the verdict was given: the exception carrying it does not override it
        raise ValueError("bad request")
    assert _one(exported, "replica.generate").status.status_code is StatusCode.UNSET
    with pytest.raises(asyncio.CancelledError), tracing.child_span("replica.stream", VALID) as child:
        raise asyncio.CancelledError  # the client went away
    cancelled = _one(exported, "replica.stream")
    assert cancelled.status.status_code is StatusCode.UNSET and cancelled.attributes[CANCELLED] is True
    with tracing.child_span("replica.engine", VALID) as child:
        child.set_error("engine_dead")
    assert _one(exported, "replica.engine").attributes[ERROR_TYPE] == "engine_dead"


def test_a_span_not_activated_is_handed_on_explicitly(exported):
    span = tracing.request_span(ROUTE, VALID, activate=False)  # a streamed body ends it in another task
    with span:
        assert tracing.current_traceparent() is None and span.traceparent.startswith(f"00-{TRACE}-")
        with tracing.child_span("replica.generate", span.traceparent):
            pass
    assert _one(exported, "replica.generate").parent.span_id == _one(exported, ROUTE).context.span_id


def test_exit_in_another_context_neither_raises_nor_logs(exported, caplog):
    span = tracing.child_span("replica.stream", VALID)
    contextvars.Context().run(span.__enter__)  # entered in one task's context ...
    with caplog.at_level(logging.ERROR):
        contextvars.Context().run(span.__exit__, None, None, None)  # a stream closed by another task
    assert _one(exported, "replica.stream") and not caplog.records


# -- privacy and bounds -------------------------------------------------------------------------------------


def test_no_content_in_spans_and_attributes_stay_bounded(exported):
    secret = "my secret text"
    attrs = {"gen_ai.prompt": secret, "gen_ai.input.messages": secret, "gen_ai.completion": secret,
             "gen_ai.output.messages": secret, "gen_ai.prompt.0.content": secret, "gen_ai.system_instructions": secret,
             "gen_ai.usage.prompt_tokens": 3, GEN_AI_REQUEST_MODEL: "m" * 1_000, "modelfleet.none": None,
             "modelfleet.object": object(), "gen_ai.request.seed": 2**70, "modelfleet.surrogate": "a\ud800b",
             "modelfleet.mixed": [1, "a"], "modelfleet.long_list": list(range(1_000)), "x" * 500: 1}
    with tracing.request_span("n" * 1_000, VALID, attrs) as span:
        span.set_attribute("gen_ai.output.messages", secret)
        span.set_attributes({GEN_AI_RESPONSE_FINISH_REASONS: ("stop",), GEN_AI_USAGE_OUTPUT_TOKENS: 9})
        span.set_attribute("gen_ai.choice.text", secret)
    (s,) = exported.get_finished_spans()
    assert secret not in s.to_json() and len(s.name) == 128
    assert set(s.attributes) == {"gen_ai.usage.prompt_tokens", GEN_AI_REQUEST_MODEL, "gen_ai.request.seed",
                                 "modelfleet.surrogate", "modelfleet.long_list", GEN_AI_RESPONSE_FINISH_REASONS,
                                 GEN_AI_USAGE_OUTPUT_TOKENS}
    assert s.attributes[GEN_AI_REQUEST_MODEL] == "m" * 256 and s.attributes["gen_ai.request.seed"] == str(2**70)
    assert s.attributes["modelfleet.surrogate"] == "a?b" and len(s.attributes["modelfleet.long_list"]) == 32
    assert s.attributes[GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)


def test_attribute_names_follow_the_semantic_conventions():
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
    from opentelemetry.semconv.attributes import error_attributes, http_attributes

    assert (tracing.HTTP_REQUEST_METHOD, tracing.HTTP_ROUTE, tracing.HTTP_RESPONSE_STATUS_CODE) == (
        http_attributes.HTTP_REQUEST_METHOD, http_attributes.HTTP_ROUTE, http_attributes.HTTP_RESPONSE_STATUS_CODE)
    assert tracing.ERROR_TYPE == error_attributes.ERROR_TYPE
    for name in ("GEN_AI_OPERATION_NAME", "GEN_AI_REQUEST_MODEL", "GEN_AI_REQUEST_MAX_TOKENS",
                 "GEN_AI_REQUEST_TEMPERATURE", "GEN_AI_REQUEST_TOP_P", "GEN_AI_REQUEST_STREAM", "GEN_AI_RESPONSE_ID",
                 "GEN_AI_RESPONSE_MODEL", "GEN_AI_RESPONSE_FINISH_REASONS", "GEN_AI_USAGE_INPUT_TOKENS",
                 "GEN_AI_USAGE_OUTPUT_TOKENS"):
        assert getattr(tracing, name) == getattr(gen_ai, name)
    for content in (gen_ai.GEN_AI_PROMPT, gen_ai.GEN_AI_COMPLETION, gen_ai.GEN_AI_INPUT_MESSAGES,
                    gen_ai.GEN_AI_OUTPUT_MESSAGES, gen_ai.GEN_AI_SYSTEM_INSTRUCTIONS, gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS,
                    gen_ai.GEN_AI_TOOL_CALL_RESULT, gen_ai.GEN_AI_RETRIEVAL_QUERY_TEXT):
        assert not tracing.allowed_key(content)
