"""OpenAI response bodies from a replica's ``Chunk``s: whole responses (accumulated once, here) and stream
events. ``Shaper`` holds what one response needs across its chunks (id, created, kind).

Example:
    >>> s = Shaper("completion", "m")
    >>> s.whole([Chunk("ab", (1, 2), None, 3, 2), Chunk("c", (3,), "length", 3, 3)])["choices"][0]["text"]
    'abc'
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from deployments.messages import Chunk, TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _chat_logprobs(entries: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    def one(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top[:top_n]]}
                        for e in entries]}


class Shaper:
    """Builds the OpenAI bodies of one completion or chat response."""

    def __init__(self, kind: Literal["completion", "chat"], model: str, logprobs: int | None = None,
                 echo: str = "") -> None:
        self.kind, self.model, self.logprobs, self.echo = kind, model, logprobs, echo
        self.id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "text_completion" if kind == "completion" else "chat.completion.chunk"
        self._role_sent = False
        self._text_offset = 0

    def whole(self, chunks: Iterable[Chunk]) -> dict[str, Any]:
        chunks = list(chunks)
        text = self.echo + "".join(c.text for c in chunks)
        lps = [e for c in chunks for e in (c.logprobs or ())]
        last = chunks[-1]
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": last.finish_reason,
                                      "logprobs": _completion_logprobs(lps) if self.logprobs is not None else None}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": _chat_logprobs(lps, self.logprobs or 0) if self.logprobs is not None else None,
                      "finish_reason": last.finish_reason}
            obj = "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage(last.prompt_tokens, last.completion_tokens)}

    def events(self, chunk: Chunk) -> Iterator[dict[str, Any]]:
        """Stream events for one chunk (none for an empty, unfinished one; chat starts with the role)."""
        base = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        if self.kind == "chat" and not self._role_sent:
            self._role_sent = True
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
        if not chunk.text and chunk.finish_reason is None:
            return
        if self.kind == "completion":
            lps = None
            if self.logprobs is not None and chunk.logprobs:
                lps = _completion_logprobs(list(chunk.logprobs), self._text_offset)
            self._text_offset += len(chunk.text)
            choice: dict[str, Any] = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason,
                                      "logprobs": lps}
        else:
            choice = {"index": 0, "delta": {"content": chunk.text} if chunk.text else {},
                      "finish_reason": chunk.finish_reason}
            if self.logprobs is not None and chunk.logprobs:
                choice["logprobs"] = _chat_logprobs(list(chunk.logprobs), self.logprobs)
        event = {**base, "choices": [choice]}
        if chunk.finish_reason is not None:
            event["usage"] = usage(chunk.prompt_tokens, chunk.completion_tokens)
        yield event

    def usage_event(self, last: Chunk) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [],
                "usage": usage(last.prompt_tokens, last.completion_tokens)}


def embedding_response(model: str, result: dict[str, Any], encoding_format: str | None) -> dict[str, Any]:
    def encode(vector: list[float]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    data = [{"object": "embedding", "index": d["index"], "embedding": encode(d["embedding"])} for d in result["data"]]
    n = result["prompt_tokens"]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}}
