"""Tracing configuration and the real OTLP export (HTTP and gRPC collectors on 127.0.0.1)."""

from __future__ import annotations

import logging
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deployments import tracing
from deployments.tracing import (
    GEN_AI_REQUEST_MODEL,
    TracingConfig,
)
from tests.unit.deployments.test_tracing import PARENT, ROUTE, TRACE, VALID, _fresh, no_proxy  # noqa: F401

# -- configuration --------------------------------------------------------------------------------------------


def test_config_is_plain_validated_and_keeps_headers_out_of_its_repr():
    headers = {"Authorization": "Bearer s3cret"}
    config = TracingConfig("http://collector:4318", headers=headers, sample_ratio=0.5)
    headers["Authorization"] = "changed"
    assert config.headers == {"Authorization": "Bearer s3cret"} and "s3cret" not in repr(config)
    assert pickle.loads(pickle.dumps(config)) == config and hash(config) == hash(pickle.loads(pickle.dumps(config)))
    for bad in (dict(protocol="thrift"), dict(sample_ratio=1.5), dict(sample_ratio=-0.1), dict(service_name=""),
                dict(otlp_endpoint="collector:4318")):  # http/protobuf wants a URL
        with pytest.raises(ValueError):
            TracingConfig(**bad)
    assert TracingConfig("collector:4317", protocol="grpc").otlp_endpoint == "collector:4317"


def test_setup_is_idempotent_and_never_logs_a_credential(caplog):
    exporter = InMemorySpanExporter()
    first = tracing.setup(TracingConfig(), exporter=exporter)
    assert tracing.setup(TracingConfig(), exporter=exporter) is first and first.exporter is exporter
    provider = first.provider
    with caplog.at_level(logging.INFO, logger="deployments.tracing"):
        again = tracing.setup(TracingConfig("http://127.0.0.1:9", headers={"x-api-key": "k3y"}))
    assert again is first and first.provider is provider and "first configuration" in caplog.text
    tracing.shutdown()
    assert not first.enabled and first.provider is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deployments.tracing"):
        tracing.setup(TracingConfig("http://user:pw@127.0.0.1:9/base?token=t0k", headers={"x-api-key": "k3y"}))
    assert "127.0.0.1:9/base" in caplog.text
    assert not any(secret in caplog.text for secret in ("pw", "t0k", "k3y"))


# -- the export path, for real --------------------------------------------------------------------------------


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)  # an empty body is an empty ExportTraceServiceResponse
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_are_exported_over_otlp_http_when_an_endpoint_is_configured(no_proxy):  # noqa: F811
    handler = type("Collector", (_Collector,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = TracingConfig(f"http://127.0.0.1:{server.server_port}", protocol="http/protobuf",
                               service_name="modelfleet-test", headers={"Authorization": "Bearer s3cret"})
        tracing.setup(config)
        with tracing.request_span(ROUTE, VALID, {GEN_AI_REQUEST_MODEL: "bad\ud800model"}):  # must not sink a batch
            pass
        assert tracing.flush(timeout_s=10)
    finally:
        tracing.shutdown()
        server.shutdown()
        server.server_close()
    assert handler.received, "the collector got no POST"
    path, headers, body = handler.received[0]
    assert path == "/v1/traces" and headers["content-type"] == "application/x-protobuf"
    assert headers["authorization"] == "Bearer s3cret"
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    (span,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert service == "modelfleet-test" and span.name == ROUTE and span.trace_id.hex() == TRACE
    assert span.parent_span_id.hex() == PARENT


def test_spans_are_exported_over_otlp_grpc_when_an_endpoint_is_configured(no_proxy):  # noqa: F811
    import grpc

    received: list[tuple[ExportTraceServiceRequest, dict[str, str]]] = []

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append((request, dict(context.invocation_metadata())))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tracing.setup(TracingConfig(f"http://127.0.0.1:{port}", protocol="grpc", headers={"X-Api-Key": "k3y"}))
        with tracing.child_span("replica.generate", VALID):
            pass
        assert tracing.flush(timeout_s=10)
    finally:
        tracing.shutdown()
        server.stop(grace=None)
    assert received, "the collector got no Export call"
    request, metadata = received[0]
    (span,) = [s for rs in request.resource_spans for scope in rs.scope_spans for s in scope.spans]
    assert span.name == "replica.generate" and span.trace_id.hex() == TRACE and metadata["x-api-key"] == "k3y"
