"""The ingress stages alone, without Ray: request ids, size / type / depth limits, the seams."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.ingress.stages import (
    Admitted,
    Incoming,
    Limits,
    Pipeline,
    body_chunks,
    parse_json,
    request_id,
)
from deployments.messages import ErrorInfo, ServeError

JSON = {"content-type": "application/json"}


def admit(pipeline: Pipeline, headers: dict[str, str], parts: list[bytes], path: str = "/v1/completions") -> Admitted:
    return asyncio.run(pipeline.admit(Incoming("POST", path, headers, body_chunks(parts))))


def status_of(fn) -> ErrorInfo:
    with pytest.raises(ServeError) as caught:
        fn()
    return caught.value.info


def test_request_id_is_the_clients_when_sane_else_fresh():
    assert request_id({"x-request-id": "abc-123.x:y"}) == "abc-123.x:y"
    fresh = {request_id({}), request_id({})}
    assert len(fresh) == 2 and all(r.startswith("req-") for r in fresh)
    for hostile in ("a b", "x" * 129, "line\nbreak", "ünï"):
        assert request_id({"x-request-id": hostile}) != hostile


def test_body_over_the_limit_is_413_by_header_and_by_stream():
    p = Pipeline(Limits(max_body_bytes=1024))
    assert status_of(lambda: admit(p, {**JSON, "content-length": "2048"}, [b"{}"])).status == 413
    # No content-length (chunked): refused while reading, as soon as the limit is passed.
    chunks = [b"x" * 600, b"x" * 600, b"never read" * 10]
    assert status_of(lambda: admit(p, JSON, chunks)).status == 413
    assert admit(p, JSON, [b'{"model": "m"}']).body == {"model": "m"}


@pytest.mark.parametrize("ctype", ["text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_non_json_content_type_is_415(ctype):
    info = status_of(lambda: admit(Pipeline(Limits()), {"content-type": ctype}, [b"{}"]))
    assert info.status == 415 and info.body()["error"]["code"] == "unsupported_media_type"


def test_json_content_type_with_charset_is_accepted():
    got = admit(Pipeline(Limits()), {"content-type": "Application/JSON; charset=utf-8"}, [b'{"a": 1}'])
    assert got.body == {"a": 1} and got.deadline > got.started


@pytest.mark.parametrize("raw", [b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 5000 + b"1" + b"}" * 5000])
def test_deep_nesting_is_400_not_recursion(raw):
    info = status_of(lambda: parse_json(raw, Limits(max_json_depth=32)))
    assert info.status == 400 and "nested deeper" in info.message


def test_brackets_inside_strings_do_not_count_as_depth():
    raw = json.dumps({"prompt": "[" * 5000 + '{"' * 100, "model": "m"}).encode()
    assert parse_json(raw, Limits(max_json_depth=4))["model"] == "m"


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b'"a string"', b""])
def test_invalid_or_non_object_json_is_400(raw):
    assert status_of(lambda: parse_json(raw, Limits())).status == 400


def test_seams_run_in_order_and_can_refuse():
    seen: list[str] = []

    class Keys:
        async def authenticate(self, rid, headers, route):
            seen.append("auth")
            if headers.get("authorization") != "Bearer ok":
                raise ServeError(ErrorInfo(401, "no key", code="invalid_api_key"))
            return "key-1"

    class Limiter:
        async def admit(self, request):
            seen.append(f"limit:{request.principal}")

    p = Pipeline(Limits(), auth=Keys(), rate_limiter=Limiter())
    assert status_of(lambda: admit(p, JSON, [b"{}"])).status == 401
    got = admit(p, {**JSON, "authorization": "Bearer ok"}, [b"{}"])
    assert got.principal == "key-1" and seen == ["auth", "auth", "limit:key-1"]


def test_get_routes_read_no_body():
    got = asyncio.run(Pipeline(Limits()).admit(Incoming("GET", "/v1/models", {})))
    assert got.body is None and got.route == "/v1/models"
