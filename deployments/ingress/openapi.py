"""The ingress's OpenAPI 3.1 document, generated once from the pydantic request schemas (no FastAPI on the
request path: the document costs nothing per request or per token).

Example:
    >>> doc = openapi_document(["tiny-code-llama"], ["all-minilm-l6-v2"])
    >>> sorted(doc["paths"])[:2]
    ['/health', '/openapi.json']
"""

from __future__ import annotations

from typing import Any

from deployments.ingress.protocol import ROUTE_SCHEMAS

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _responses(ok: dict[str, Any]) -> dict[str, Any]:
    error = {"description": "OpenAI error body", "content": {"application/json": {"schema": {"$ref":
                                                                                            "#/components/schemas/Error"}}}}
    return {"200": ok, **{str(s): error for s in (400, 404, 413, 415, 503, 504)}}


def openapi_document(llms: list[str], embedders: list[str]) -> dict[str, Any]:
    """Paths and request schemas; ``model`` lists the served names (so generated clients and fuzzers aim at
    real models)."""
    components: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, Any] = {}
    for route, model in ROUTE_SCHEMAS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components[name] = sub
        names = embedders if route == "/v1/embeddings" else llms
        if names:
            schema["properties"]["model"] = {**schema["properties"]["model"], "enum": names}
        components[model.__name__] = schema
        ok = {"description": "the result (JSON, or server-sent events when stream is true)",
              "content": {"application/json": {"schema": {"type": "object"}},
                          "text/event-stream": {"schema": {"type": "string"}}}}
        paths[route] = {"post": {"operationId": model.__name__, "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
            "responses": _responses(ok)}}
    plain = {"description": "JSON", "content": {"application/json": {"schema": {"type": "object"}}}}
    paths["/v1/models"] = {"get": {"operationId": "listModels", "responses": {"200": plain}}}
    paths["/health"] = {"get": {"operationId": "health", "responses": {"200": plain, "503": plain}}}
    paths["/openapi.json"] = {"get": {"operationId": "openapi", "responses": {"200": plain}}}
    return {"openapi": "3.1.0", "info": {"title": "modelfleet", "version": "0.2.0"}, "paths": paths,
            "components": {"schemas": components}}
