"""The asyncio front of the engine, for servers: ``generate`` as an async iterator, ``abort``, ``stats``.

The engine's step loop runs in one background thread (torch releases the GIL inside kernels, so the event
loop stays responsive). Callers never touch the engine: they post commands to a queue, and the loop thread
hands a step's outputs back with one ``call_soon_threadsafe`` per event loop (not one per request: each wakeup
costs the loop a syscall and a GIL hand-off). A caller that finds several outputs queued takes them merged.
A caller that stops iterating (a client that disconnects) aborts its request, which frees its KV blocks
before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from parallel.config import EngineConfig
from parallel.engine import EngineStats, LLMEngine
from parallel.outputs import RequestOutput, merge_outputs
from parallel.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests in flight cannot finish."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> RequestOutput | BaseException:
        """The next item; consecutive outputs already queued come merged into one."""
        item = await self.queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self.queue.empty():
            nxt = self.queue.get_nowait()
            if isinstance(nxt, BaseException):
                return nxt
            item = merge_outputs(item, nxt)
        return item


def _deliver(batch: list[tuple[_Stream, RequestOutput]]) -> None:
    """Runs on the callers' event loop: hand one step's outputs to their streams."""
    for stream, out in batch:
        stream.queue.put_nowait(out)


class AsyncEngine:
    """Serves many concurrent async callers from one engine thread.

    Example:
        >>> engine = AsyncEngine.from_options("models/tiny-code-llama")
        >>> async for out in engine.generate("r1", "def f():", SamplingParams(max_tokens=8)):
        ...     print(out.outputs[0].delta_text, end="")
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self._stats = engine.stats()
        self._interval = engine.config.scheduler.stream_interval
        self._held: dict[str, RequestOutput] = {}  # loop thread only: outputs waiting for stream_interval tokens
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, path: str, proposer: Any = None, **options: Any) -> AsyncEngine:
        return cls(LLMEngine(EngineConfig.from_options(path, **options), proposer))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Validate and tokenize (thread-safe: reads only immutable engine facts)."""
        return self.engine.encode_prompt(prompt)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def check_health(self) -> None:
        """Raises when the loop died or a model rank is gone (call from a thread: it may block briefly)."""
        if not self.is_alive():
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")
        self.engine.check_health()

    # ---- public API -------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one request; the last one has ``finished=True``.

        Bad input raises ValueError before anything is queued. Leaving the loop early aborts the request.
        """
        if self.error is not None:
            raise EngineDeadError(f"engine loop failed: {self.error!r}")
        self.encode_prompt(prompt)  # validate here, so bad input raises in the caller
        stream = _Stream(asyncio.get_running_loop())
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = stream
        self._post("add", (request_id, prompt, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        self._post("abort", request_id)

    def stats(self) -> EngineStats:
        """The snapshot published after the latest step (thread-safe)."""
        return self._stats

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # ---- the loop thread --------------------------------------------------------------------------------
    def _post(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, prompt, params = payload
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as err:
                    stream = self._streams.pop(request_id, None)
                    if stream is not None:
                        stream.put(err)
            else:
                self.engine.abort(payload)
                self._streams.pop(payload, None)
                self._held.pop(payload, None)

    def _run(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # a bug or a device failure: fail loudly, never hang callers
                logger.exception("engine step failed")
                self.error = err
                for stream in self._streams.values():
                    stream.put(EngineDeadError(f"engine step failed: {err!r}"))
                self._streams.clear()
                return
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None and self._interval > 1:
                    out = self._hold(out)
                    if out is None:
                        continue
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, out))
                    if out.finished:
                        del self._streams[out.request_id]
            for loop, batch in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that caller's loop is closed: nobody listens any more
                    loop.call_soon_threadsafe(_deliver, batch)
            self._stats = self.engine.stats()

    def _hold(self, out: RequestOutput) -> RequestOutput | None:
        """stream_interval > 1: merge a request's outputs until ``interval`` tokens are new; the first token
        and the final output go at once. None: held for now."""
        held = self._held.pop(out.request_id, None)
        if held is not None:
            out = merge_outputs(held, out)
        c = out.outputs[0]
        if out.finished or len(c.delta_token_ids) >= self._interval or len(c.token_ids) == len(c.delta_token_ids):
            return out
        self._held[out.request_id] = out
        return None
