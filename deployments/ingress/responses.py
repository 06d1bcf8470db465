"""OpenAI response bodies from a replica's ``Chunk``s: whole responses (accumulated once, here) and stream
events. ``Shaper`` holds what one response needs across its chunks (id, created, kind).

Example:
    >>> s = Shaper("completion", "m")
    >>> s.whole([Chunk("ab", (1, 2), None, 3, 2), Chunk("c", (3,), "length", 3, 3)])["choices"][0]["text"]
    'abc'
"""

from __future__ import annotations

import base64
import math
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
    """OpenAI's completions logprobs; an echoed prompt's first token has none (null, as vLLM answers)."""
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    none = [math.isnan(e.logprob) for e in entries]
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [None if n else e.logprob for e, n in zip(entries, none, strict=True)],
            "top_logprobs": [None if n else dict(e.top) for e, n in zip(entries, none, strict=True)],
            "text_offset": offsets}


def _chat_logprobs(entries: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    def one(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top[:top_n]]}
                        for e in entries]}


class Shaper:
    """Builds the OpenAI bodies of one completion or chat response of ``choices`` choices (prompts x n)."""

    def __init__(self, kind: Literal["completion", "chat"], model: str, logprobs: int | None = None,
                 choices: int = 1) -> None:
        self.kind, self.model, self.logprobs, self.choices = kind, model, logprobs, choices
        self.id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "text_completion" if kind == "completion" else "chat.completion.chunk"
        self._role_sent: set[int] = set()
        self._text_offset: dict[int, int] = {}

    def _entries(self, c: Chunk) -> list[TokenLogprob]:
        return [*(c.prompt_logprobs or ()), *(c.logprobs or ())]

    def whole(self, chunks: Iterable[Chunk]) -> dict[str, Any]:
        chunks = list(chunks)
        by_index: dict[int, list[Chunk]] = {}
        for c in chunks:
            by_index.setdefault(c.index, []).append(c)
        choices = [self._choice(i, cs) for i, cs in sorted(by_index.items())]
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(max(c.prompt_tokens for c in chunks), max(c.completion_tokens for c in chunks))}

    def _choice(self, index: int, chunks: list[Chunk]) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        lps = [e for c in chunks for e in self._entries(c)]
        reason = chunks[-1].finish_reason
        if self.kind == "completion":
            text = (chunks[0].prompt_text or "") + text
            return {"index": index, "text": text, "finish_reason": reason,
                    "logprobs": _completion_logprobs(lps) if self.logprobs is not None else None}
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(lps, self.logprobs or 0) if self.logprobs is not None else None,
                "finish_reason": reason}

    def events(self, chunk: Chunk) -> Iterator[dict[str, Any]]:
        """Stream events for one chunk (none for an empty, unfinished one; a chat choice starts with the role)."""
        base = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        i = chunk.index
        if self.kind == "chat" and i not in self._role_sent:
            self._role_sent.add(i)
            yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
        text = chunk.text if self.kind == "chat" else (chunk.prompt_text or "") + chunk.text
        if not text and chunk.finish_reason is None:
            return
        if self.kind == "completion":
            lps = None
            entries = self._entries(chunk)
            if self.logprobs is not None and entries:
                lps = _completion_logprobs(entries, self._text_offset.get(i, 0))
            self._text_offset[i] = self._text_offset.get(i, 0) + len(text)
            choice: dict[str, Any] = {"index": i, "text": text, "finish_reason": chunk.finish_reason, "logprobs": lps}
        else:
            choice = {"index": i, "delta": {"content": text} if text else {}, "finish_reason": chunk.finish_reason}
            if self.logprobs is not None and chunk.logprobs:
                choice["logprobs"] = _chat_logprobs(list(chunk.logprobs), self.logprobs)
        event = {**base, "choices": [choice]}
        if chunk.finish_reason is not None and self.choices == 1:  # (with several, the usage event has it)
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
