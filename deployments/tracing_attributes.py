"""Span attributes for ``deployments/tracing.py``: the semantic-convention names, the cleaning every
attribute passes (bounded, flat, never content: keys naming content are dropped, strings cut, ints kept to
int64, sequences flat and of one type, at most ``MAX_ATTRIBUTES`` per span), and the W3C traceparent parser.

Example:
    >>> clean({GEN_AI_REQUEST_MODEL: "m", "gen_ai.prompt": "secret", "n": 2**70})
    {'gen_ai.request.model': 'm', 'n': '1180591620717411303424'}
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from enum import Enum
from typing import Final

# Semantic-convention names (HTTP stable, GenAI incubating); the test checks them against the semconv package.
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_ROUTE: Final = "http.route"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
ERROR_TYPE: Final = "error.type"
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
REQUEST_ID: Final = "modelfleet.request.id"  # no convention exists for a server-side request id
CANCELLED: Final = "modelfleet.cancelled"

MAX_STRING: Final = 256  # attribute strings are cut here
MAX_NAME = 128
_MAX_ITEMS = 32  # items kept from a sequence attribute
MAX_ATTRIBUTES = 64
MAX_TRACEPARENT = 512  # W3C sets no cap for future versions; a longer header is hostile, not a trace
_INT64 = 2**63
_CONTENT_SEGMENTS: Final = frozenset(
    {"prompt", "completion", "messages", "content", "text", "system_instructions", "arguments", "result",
     "documents"})

@functools.lru_cache(maxsize=512)
def allowed_key(key: object) -> bool:
    return (isinstance(key, str) and 0 < len(key) <= MAX_NAME
            and not any(part in _CONTENT_SEGMENTS for part in key.split(".")))


def clean_string(value: str, limit: int = MAX_STRING) -> str:
    value = value[:limit]
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid JSON) would fail the whole OTLP batch's encoding
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _scalar(value: object) -> str | bool | int | float | None:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)[:MAX_STRING]  # OTLP ints are int64
    if isinstance(value, str):
        return clean_string(value)
    return None  # an object's repr may hold anything, text included


def clean_value(value: object) -> object:
    if isinstance(value, list | tuple):
        items = [_scalar(v) for v in value[:_MAX_ITEMS]]
        if None in items or len({type(v) for v in items}) > 1:
            return None  # OpenTelemetry takes only flat, homogeneous sequences
        return tuple(items)
    return _scalar(value)


def clean(attributes: Mapping[str, object] | None) -> dict[str, object]:
    if not attributes:
        return {}
    cleaned = {}
    for key, value in list(attributes.items())[:MAX_ATTRIBUTES]:
        if allowed_key(key):
            value = clean_value(value)
            if value is not None:
                cleaned[key] = value
    return cleaned


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parse_traceparent(traceparent: object) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a valid W3C traceparent; None for anything else (never raises)."""
    if not isinstance(traceparent, str) or len(traceparent) > MAX_TRACEPARENT:
        return None
    value = traceparent.strip(" \t")
    match = _TRACEPARENT.fullmatch(value[:55])
    if match is None:
        return None
    version, trace_hex, span_hex, flags = match.groups()
    if version == "ff" or (version == "00" and len(value) != 55) or (len(value) > 55 and value[55] != "-"):
        return None  # ff is forbidden; a later version may append fields after a dash, 00 may not
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, int(flags, 16)
