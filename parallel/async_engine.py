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
from parallel.engine_core import EngineCoreClient, OutputAccumulator
from parallel.inputs import encode_prompt
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
    """Serves many concurrent async callers from one engine loop: a thread of this process, or (with
    ``engine_process=True``) a child process that owns the model (``parallel.engine_core``), relayed by a
    reader thread here.

    Example:
        >>> engine = AsyncEngine.from_options("models/tiny-code-llama", engine_process=True)
        >>> async for out in engine.generate("r1", "def f():", SamplingParams(max_tokens=8)):
        ...     print(out.outputs[0].delta_text, end="")
    """

    def __init__(self, engine: LLMEngine | None = None, core: EngineCoreClient | None = None) -> None:
        if (engine is None) == (core is None):
            raise ValueError("give exactly one of engine (in-process loop) and core (engine process)")
        self.engine, self.core = engine, core
        facts: Any = engine if engine is not None else core
        self.config: EngineConfig = facts.config
        self.tokenizer = facts.tokenizer
        self.max_model_len: int = facts.max_model_len
        self._vocab_size: int = facts.vocab_size
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._acc: dict[str, OutputAccumulator] = {}  # engine process: cumulative outputs rebuilt from deltas
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self._stats = engine.stats() if engine is not None else core.initial_stats  # type: ignore[union-attr]
        self._interval = self.config.scheduler.stream_interval
        self._held: dict[str, RequestOutput] = {}  # loop thread only: outputs waiting for stream_interval tokens
        target = self._run if engine is not None else self._relay
        self._thread = threading.Thread(target=target, name="engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, path: str, proposer: Any = None, engine_process: bool = False,
                     **options: Any) -> AsyncEngine:
        """``engine_process``: run the step loop in a child process (one rank, no remote draft)."""
        config = EngineConfig.from_options(path, **options)
        if engine_process and proposer is None and config.parallel.tensor_parallel_size == 1:
            return cls(core=EngineCoreClient(config))
        return cls(LLMEngine(config, proposer))

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Validate and tokenize (thread-safe: reads only immutable engine facts)."""
        return encode_prompt(prompt, self.tokenizer, self._vocab_size, self.max_model_len)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def check_health(self) -> None:
        """Raises when the loop died or a model rank is gone (call from a thread: it may block briefly)."""
        if not self.is_alive():
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")
        if self.engine is not None:
            self.engine.check_health()
        elif not self.core.is_alive():  # type: ignore[union-attr]
            raise EngineDeadError("engine process exited")

    # ---- public API -------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one request; the last one has ``finished=True``.

        Bad input raises ValueError before anything is queued. Leaving the loop early aborts the request.
        """
        if self.error is not None:
            raise EngineDeadError(f"engine loop failed: {self.error!r}")
        ids = self.encode_prompt(prompt)  # validate here, so bad input raises in the caller
        stream = _Stream(asyncio.get_running_loop())
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = stream
        if self.core is not None:
            self._acc[request_id] = OutputAccumulator(prompt if isinstance(prompt, str) else None, tuple(ids),
                                                      params.logprobs is not None)
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
        if self.engine is not None:
            self.engine.shutdown()
        else:
            self.core.shutdown()  # type: ignore[union-attr]

    # ---- the loop thread --------------------------------------------------------------------------------
    def _post(self, kind: str, payload: Any) -> None:
        if self.core is not None:  # the engine process reads its own pipe: no local queue
            if kind == "abort":
                self._streams.pop(payload, None)
                self._acc.pop(payload, None)
                self._held.pop(payload, None)
            with contextlib.suppress(BrokenPipeError, OSError):  # a dead process is reported by the relay
                self.core.send(kind, payload)
            return
        self._commands.put((kind, payload))
        self._wake.set()

    def _drain_commands(self) -> None:
        assert self.engine is not None
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
        assert self.engine is not None
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
                self._fail(err)
                return
            self._dispatch(outputs)
            self._stats = self.engine.stats()

    def _relay(self) -> None:
        """Engine process mode: read step results from the child and hand them to the streams."""
        core = self.core
        assert core is not None
        while not self._stop:
            try:
                if not core.poll(0.5):
                    if not core.is_alive() and not self._stop:
                        self._fail(RuntimeError("engine process exited"))
                        return
                    continue
                kind, payload = core.recv()
            except (EOFError, OSError) as err:
                if not self._stop:
                    self._fail(RuntimeError(f"engine process connection lost: {err!r}"))
                return
            if kind == "outputs":
                deltas, self._stats = payload
                outputs = []
                for d in deltas:
                    acc = self._acc.get(d.request_id)
                    if acc is None:
                        continue  # aborted meanwhile
                    outputs.append(acc.add(d))
                    if d.finished:
                        self._acc.pop(d.request_id, None)
                self._dispatch(outputs)
            elif kind == "stats":
                self._stats = payload
            elif kind == "rejected":
                request_id, message = payload
                self._acc.pop(request_id, None)
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    stream.put(ValueError(message))
            elif kind == "dead":
                self._fail(RuntimeError(payload))
                return

    def _fail(self, err: BaseException) -> None:
        self.error = err
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError(f"engine step failed: {err!r}"))
        self._streams.clear()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
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
                    self._streams.pop(out.request_id, None)
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that caller's loop is closed: nobody listens any more
                loop.call_soon_threadsafe(_deliver, batch)

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
