"""OpenAI response bodies built from LLMServer items (``{"text", "token_ids", "finish_reason", ...}``)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from typing import Any

from deployments.openai_protocol import new_id, now, usage


def _usage_of(item: dict[str, Any]) -> dict[str, int]:
    return usage(item.get("prompt_tokens", 0), item.get("completion_tokens", 0))


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def _chat_logprobs(entries: list[dict[str, Any]], top_n: int) -> dict[str, Any]:
    def one(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"][:top_n]]}
                        for e in entries]}


def completion_response(req: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(i["text"] for i in items)
    logprobs = [e for i in items for e in (i.get("logprobs") or [])]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model,
            "choices": [{"index": 0, "text": (req.single_prompt() if req.echo and isinstance(req.single_prompt(), str)
                                              else "") + text,
                         "logprobs": _completion_logprobs(logprobs) if req.logprobs is not None else None,
                         "finish_reason": items[-1]["finish_reason"]}],
            "usage": _usage_of(items[-1])}


def chat_response(req: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    logprobs = [e for i in items for e in (i.get("logprobs") or [])]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(i["text"] for i in items)},
                         "logprobs": _chat_logprobs(logprobs, req.top_logprobs or 0) if req.logprobs else None,
                         "finish_reason": items[-1]["finish_reason"]}],
            "usage": _usage_of(items[-1])}


def completion_chunk(req: Any, item: dict[str, Any], state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    state.setdefault("id", new_id("cmpl"))
    state.setdefault("created", now())
    if not item["text"] and item["finish_reason"] is None:
        return
    event = {"id": state["id"], "object": "text_completion", "created": state["created"], "model": req.model,
             "choices": [{"index": 0, "text": item["text"], "finish_reason": item["finish_reason"],
                          "logprobs": _completion_logprobs(item["logprobs"]) if item.get("logprobs") else None}]}
    if item["finish_reason"] is not None:
        event["usage"] = _usage_of(item)
    yield event


def chat_chunk(req: Any, item: dict[str, Any], state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    base = {"id": state.setdefault("id", new_id("chatcmpl")), "object": "chat.completion.chunk",
            "created": state.setdefault("created", now()), "model": req.model}
    if not state.get("role_sent"):
        state["role_sent"] = True
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
    if not item["text"] and item["finish_reason"] is None:
        return
    choice: dict[str, Any] = {"index": 0, "delta": {"content": item["text"]} if item["text"] else {},
                              "finish_reason": item["finish_reason"]}
    if req.logprobs and item.get("logprobs"):
        choice["logprobs"] = _chat_logprobs(item["logprobs"], req.top_logprobs or 0)
    event = {**base, "choices": [choice]}
    if item["finish_reason"] is not None:
        event["usage"] = _usage_of(item)
    yield event


def usage_chunk(req: Any, last: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    kind = "chat.completion.chunk" if hasattr(req, "messages") else "text_completion"
    return {"id": state.get("id", new_id("cmpl")), "object": kind, "created": state.get("created", now()),
            "model": req.model, "choices": [], "usage": _usage_of(last)}


def embedding_response(model: str, result: dict[str, Any], encoding_format: str) -> dict[str, Any]:
    def encode(vector: list[float]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    data = [{"object": "embedding", "index": d["index"], "embedding": encode(d["embedding"])} for d in result["data"]]
    n = result["prompt_tokens"]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}}
