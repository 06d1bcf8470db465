"""Tool calls in chat responses (OpenAI's shape, vLLM's behaviour), as a layer over ``responses.Shaper``.

What the model wrote becomes ``tool_calls`` (``id``, ``type: "function"``, ``function: {name, arguments}``,
arguments as JSON text), per ``tool_choice`` (``deployments/ingress/structured.py`` constrains the output):
- a named function: the output is its arguments: one call. finish_reason stays "stop", as OpenAI and vLLM
  answer a forced function;
- ``required``: the output is a JSON array of ``{"name", "parameters"}``: one call each; finish_reason
  "tool_calls";
- ``auto``: hermes-style ``<tool_call>{"name": .., "arguments": ..}</tool_call>`` blocks are parsed out (the
  idea of vLLM's Hermes2ProToolParser); the text before the first block is the content; finish_reason
  "tool_calls" when a call parsed, and the output stays plain content when none did.
Streamed, a call's first delta carries its id, type, name and ``arguments: ""``, then argument deltas follow:
as they are generated for named and required, once the output is complete for ``auto`` (a ``<tool_call>``
block is held back until it can be parsed). Only chat events' ``content`` is rewritten, so this works on
whatever else the Shaper puts in them (several choices, logprobs, usage).

Example:
    >>> parse_hermes('ok <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    ('ok ', [('f', '{"x": 1}')])
    >>> reader = CallReader("required")
    >>> reader.feed('[{"name":"f","parameters":{"x"') + reader.feed(':1}}]')
    [('call', 'f'), ('args', '{"x"'), ('args', ':1}')]
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from deployments.ingress.responses import Shaper
from deployments.messages import Chunk

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
_BLOCKS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
# one element of the required array up to its parameters' value: [{"name":"f","parameters":  (or ,{...)
_ITEM = re.compile(r'\s*[\[,]?\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*')


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's format


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, str]]] | None:
    """(the content before the first call, [(name, arguments as JSON)]), or None when the text has no call or
    a block is not a JSON object with a name (then it is all content, as vLLM's parser falls back)."""
    start = text.find(TOOL_START)
    if start < 0:
        return None
    calls = []
    for m in _BLOCKS.finditer(text, start):
        try:
            obj = json.loads((m.group(1) if m.group(1) is not None else m.group(2)).strip())
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        calls.append((obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)))
    return text[:start] or None, calls


class CallReader:
    """Reads a constrained tool output as it grows: ``("call", name)`` when a call starts, ``("args", text)``
    for each new piece of its arguments. ``mode`` "named" (``name`` given: the whole output is the arguments)
    or "required" (a JSON array of ``{"name", "parameters"}``, scanned for strings and nesting)."""

    def __init__(self, mode: str, name: str | None = None) -> None:
        self.mode, self.name = mode, name
        self.buf, self.pos, self.in_args = "", 0, False
        self.depth, self.in_str, self.escape = 0, False, False

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.mode == "named":
            if not self.in_args and text:
                self.in_args = True
                out.append(("call", self.name or ""))
            return out + ([("args", text)] if text else [])
        self.buf += text
        while True:
            if not self.in_args:
                m = _ITEM.match(self.buf, self.pos)
                if m is None:
                    return out
                out.append(("call", json.loads(m.group(1))))
                self.pos, self.in_args, self.depth = m.end(), True, 0
                continue
            start, end = self.pos, self._scan()
            if end > start:
                out.append(("args", self.buf[start:end]))
            if self.pos == len(self.buf):  # the value goes on in the next piece
                return out
            self.pos += 1  # past the call's closing brace
            self.in_args = False

    def _scan(self) -> int:
        """Advance ``pos`` to the brace that closes the current call (or the end): the arguments' end."""
        buf = self.buf
        while self.pos < len(buf):
            c = buf[self.pos]
            if self.in_str:  # only quotes matter in a string, and not an escaped one
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_str = False
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                if self.depth == 0:
                    return self.pos
                self.depth -= 1
            self.pos += 1
        return self.pos


def _call_deltas(items: list[tuple[str, str]], state: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI's tool_calls deltas for reader items; ``state["n"]`` counts the choice's calls so far."""
    deltas = []
    for kind, value in items:
        if kind == "call":
            state["n"] += 1
            deltas.append({"tool_calls": [{"index": state["n"] - 1, "id": call_id(), "type": "function",
                                           "function": {"name": value, "arguments": ""}}]})
        else:
            deltas.append({"tool_calls": [{"index": state["n"] - 1, "function": {"arguments": value}}]})
    return deltas


class ToolShaper:
    """A ``Shaper`` whose chat bodies and events carry tool calls (``mode``: named, required or auto).

    Example:
        >>> s = ToolShaper(Shaper("chat", "m"), "named", "get_weather")
        >>> choice = s.whole([Chunk('{"city":"Paris"}', (1,), "stop", 3, 5)])["choices"][0]
        >>> choice["message"]["tool_calls"][0]["function"], choice["finish_reason"]
        ({'name': 'get_weather', 'arguments': '{"city":"Paris"}'}, 'stop')
    """

    def __init__(self, shaper: Shaper, mode: str, function: str | None = None) -> None:
        self._shaper, self.mode, self.function = shaper, mode, function
        self._state: dict[int, dict[str, Any]] = {}  # per choice index

    def __getattr__(self, name: str) -> Any:  # id, kind, usage_event, ...: the Shaper's own
        return getattr(self._shaper, name)

    def _calls(self, text: str) -> tuple[str | None, list[tuple[str, str]]] | None:
        if self.mode == "auto":
            return parse_hermes(text)
        calls: list[tuple[str, str]] = []
        for kind, value in CallReader(self.mode, self.function).feed(text):
            if kind == "call":
                calls.append((value, ""))
            else:
                calls[-1] = (calls[-1][0], calls[-1][1] + value)
        return None, calls

    def _reason(self, reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" and self.mode != "named" else reason

    def whole(self, chunks: Iterable[Chunk]) -> dict[str, Any]:
        body = self._shaper.whole(chunks)
        for choice in body["choices"]:
            parsed = self._calls(choice["message"]["content"] or "")
            if parsed is None:
                continue
            content, calls = parsed
            choice["message"]["content"] = content
            choice["message"]["tool_calls"] = [{"id": call_id(), "type": "function",
                                                "function": {"name": n, "arguments": a}} for n, a in calls]
            choice["finish_reason"] = self._reason(choice["finish_reason"], bool(calls))
        return body

    def events(self, chunk: Chunk) -> Iterator[dict[str, Any]]:
        for event in self._shaper.events(chunk):
            yield from self._rewrite(event)

    def _rewrite(self, event: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for choice in event["choices"]:
            delta = choice.get("delta", {})
            if "role" in delta:  # the opening event of a choice
                yield {**event, "choices": [choice]}
                continue
            state = self._state.setdefault(choice["index"], {"n": 0, "reader": CallReader(self.mode, self.function),
                                                             "held": "", "in_call": False})
            finished = choice.get("finish_reason") is not None
            deltas = self._deltas(delta.get("content") or "", finished, state)
            if not deltas and not finished:
                continue
            deltas = deltas or [{}]
            for k, d in enumerate(deltas):
                last = k == len(deltas) - 1
                out = {**choice, "delta": d}
                if not last:
                    out["finish_reason"] = None
                    out.pop("logprobs", None)
                else:
                    out["finish_reason"] = self._reason(choice.get("finish_reason"), state["n"] > 0)
                ev = {**event, "choices": [out]}
                if not last:
                    ev.pop("usage", None)  # (the finishing event keeps it)
                yield ev

    def _deltas(self, text: str, finished: bool, state: dict[str, Any]) -> list[dict[str, Any]]:
        if self.mode != "auto":
            return _call_deltas(state["reader"].feed(text), state)
        state["held"] += text
        if not state["in_call"]:
            k = state["held"].find(TOOL_START)
            if k < 0:  # hold back only what may begin a <tool_call> tag
                held = state["held"]
                keep = 0 if finished else next((n for n in range(min(len(TOOL_START) - 1, len(held)), 0, -1)
                                                if TOOL_START.startswith(held[-n:])), 0)
                out, state["held"] = held[:len(held) - keep], held[len(held) - keep:]
                return [{"content": out}] if out else []
            state["in_call"] = True
            content, state["held"] = state["held"][:k], state["held"][k:]
            return ([{"content": content}] if content else []) + self._deltas("", finished, state)
        if not finished:
            return []
        parsed = parse_hermes(state["held"])
        if parsed is None:  # not a call after all: it is content
            return [{"content": state["held"]}]
        return _call_deltas([item for name, args in parsed[1] for item in (("call", name), ("args", args))], state)
