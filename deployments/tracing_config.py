"""Where spans go: ``TracingConfig`` (the config's ``observability.tracing``) and the OTLP exporter it makes.

Example:
    >>> config = TracingConfig("http://collector:4318", headers={"authorization": "Bearer s3cret"})
    >>> "s3cret" in repr(config), config.protocol, redacted("http://user:pw@collector:4318/v1/traces")
    (False, 'http/protobuf', 'http://collector:4318/v1/traces')
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from opentelemetry.sdk.trace.export import SpanExporter

_log = logging.getLogger(__name__)

Protocol = Literal["grpc", "http/protobuf"]


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Where spans go. ``otlp_endpoint`` None (or blank) means tracing is off, the default.

    ``otlp_endpoint``: for ``http/protobuf`` a URL; a bare ``http://host:4318`` gets ``/v1/traces`` appended.
    For ``grpc`` ``http://host:4317`` (plaintext) or ``https://host:4317``. ``headers`` go to the collector
    (auth); they are left out of ``repr`` and never logged. Plain values only, so it pickles across Ray.

    Example:
        >>> config = TracingConfig("http://collector:4318", headers={"authorization": "Bearer s3cret"})
        >>> "s3cret" in repr(config), config.protocol
        (False, 'http/protobuf')
    """

    otlp_endpoint: str | None = None
    protocol: Protocol = "http/protobuf"  # the OTLP spec's default
    service_name: str = "modelfleet"
    sample_ratio: float = 1.0
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)

    def __post_init__(self) -> None:
        endpoint = (self.otlp_endpoint or "").strip() or None
        object.__setattr__(self, "otlp_endpoint", endpoint)
        object.__setattr__(self, "headers", {str(k): str(v) for k, v in dict(self.headers).items()})
        if self.protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"protocol must be 'grpc' or 'http/protobuf', not {self.protocol!r}")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in [0, 1], not {self.sample_ratio}")
        if not self.service_name:
            raise ValueError("service_name must not be empty")
        if endpoint and self.protocol == "http/protobuf" and urlsplit(endpoint).scheme not in ("http", "https"):
            raise ValueError(f"an http/protobuf endpoint is an http(s):// URL, not {redacted(endpoint)!r}")


def otlp_exporter(config: TracingConfig) -> SpanExporter:
    endpoint = config.otlp_endpoint or ""
    headers = {k.lower(): v for k, v in config.headers.items()}  # gRPC metadata keys must be lowercase
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, headers=headers or None)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    if urlsplit(endpoint).path in ("", "/"):  # a collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is given
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint, headers=headers or None)


def redacted(endpoint: str) -> str:
    # Only scheme, host, port and path are logged: a URL's userinfo or query may hold a credential.
    parts = urlsplit(endpoint if "//" in endpoint else "//" + endpoint)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme + '://' if parts.scheme else ''}{host}{parts.path}"
