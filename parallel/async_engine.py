"""The asyncio front of the native engine, for servers: the ``engine_api.Engine`` interface.

The step loop runs in a background thread (``engine_loop.ThreadLoop``) or in a child process of its own
(``engine_supervisor.ProcessLoop``, restarted in place when it dies). Callers never touch the engine: they
post commands, and the loop hands each step's deltas back with one ``call_soon_threadsafe`` per event loop
(not one per request: each wakeup costs the loop a syscall and a GIL hand-off). A caller that finds several
deltas queued takes them merged. A caller that stops iterating (a client that disconnects) aborts its
request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from parallel.config import EngineConfig
from parallel.engine import LLMEngine
from parallel.engine_api import EngineInfo
from parallel.engine_loop import EngineLoop, ThreadLoop
from parallel.engine_messages import AddRequest
from parallel.engine_stats import EngineStats
from parallel.engine_supervisor import ProcessLoop, RestartBudget
from parallel.errors import EngineDeadError, EngineError, InvalidRequestError
from parallel.inputs import encode_prompt, with_bad_words
from parallel.metrics import EngineMetrics
from parallel.outputs import OutputDelta, merge_deltas
from parallel.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineDeadError"]

logger = logging.getLogger(__name__)


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[OutputDelta | BaseException] = asyncio.Queue()
        self._pending: OutputDelta | BaseException | None = None  # taken from the queue, not merged

    def put(self, item: OutputDelta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # that caller's loop is closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> OutputDelta | BaseException:
        """The next item; consecutive deltas already queued come merged into one. An error comes alone,
        after the tokens before it (merging it in would drop them with the raise)."""
        item, self._pending = self._pending, None
        if item is None:
            item = await self.queue.get()
        while isinstance(item, OutputDelta) and not item.finished and not self.queue.empty():
            nxt = self.queue.get_nowait()
            if not isinstance(nxt, OutputDelta) or nxt.error is not None:
                self._pending = nxt
                break
            item = merge_deltas(item, nxt)
        return item


def _deliver(batch: list[tuple[_Stream, OutputDelta]]) -> None:
    """Runs on the callers' event loop: hand one step's deltas to their streams."""
    for stream, delta in batch:
        stream.queue.put_nowait(delta)


class AsyncEngine:
    """Serves many concurrent async callers from one engine loop: a thread of this process, or (with
    ``engine_process=True``) a supervised child process that owns the model.

    Example:
        >>> engine = AsyncEngine.from_options("models/tiny-code-llama", engine_process=True)
        >>> ids = engine.encode_prompt("def f():")
        >>> async for delta in engine.generate("r1", ids, SamplingParams(max_tokens=8)):
        ...     print(delta.text, end="")
    """

    def __init__(self, config: EngineConfig, proposer: Any = None, engine_process: bool = False,
                 restart_budget: RestartBudget | None = None) -> None:
        self.config = config
        self._lock = threading.Lock()  # streams: event-loop threads register, the loop's thread dispatches
        self._streams: dict[str, _Stream] = {}
        self._held: dict[str, OutputDelta] = {}  # under _lock: deltas waiting for stream_interval tokens
        self._interval = config.scheduler.stream_interval
        self._loop: EngineLoop
        if engine_process:
            if proposer is not None or config.parallel.tensor_parallel_size > 1:
                raise ValueError("engine_process runs one rank without a remote draft")
            self._loop = ProcessLoop(config, self, restart_budget)
        else:
            self._loop = ThreadLoop(LLMEngine(config, proposer), self)
        self.mode = "process" if engine_process else "thread"
        self.tokenizer = self._loop.tokenizer
        self.max_model_len: int = self._loop.max_model_len
        self.vocab_size: int = self._loop.vocab_size
        mc = config.model
        self.metrics = None if mc.disable_log_stats else EngineMetrics(
            mc.served_model_name or mc.path, max_model_len=self.max_model_len, stats=self._loop.stats,
            speculative=config.speculative.num_speculative_tokens > 0)

    @classmethod
    def from_options(cls, path: str, proposer: Any = None, engine_process: bool = False,
                     **options: Any) -> AsyncEngine:
        """``engine_process``: run the step loop in a child process (where it applies: one rank, no remote
        draft; otherwise in a thread)."""
        config = EngineConfig.from_options(path, **options)
        use_process = engine_process and proposer is None and config.parallel.tensor_parallel_size == 1
        return cls(config, proposer, use_process)

    # ---- the Engine interface ---------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return EngineInfo("native", self.max_model_len, self.vocab_size)

    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Validate and tokenize (thread-safe: reads only immutable engine facts)."""
        return encode_prompt(prompt, self.tokenizer, self.vocab_size, self.max_model_len, param)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[OutputDelta]:
        """Deltas of one request; the last one has ``finished=True``.

        Raises ``InvalidRequestError`` (bad ids, a request the engine refuses), ``RequestFailedError`` (this
        request failed inside the engine), ``EngineDeadError`` (the engine is down or restarting; at once,
        before anything is queued). Leaving the loop early aborts the request.
        """
        ids = self.encode_prompt(prompt_ids)  # cheap for ids; a bad one raises here, in the caller
        params = with_bad_words(params, self.tokenizer, self.vocab_size)  # here: the engine process gets ids
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:  # with on_dead's lock: a request registered here is either served or failed
            if not self._loop.is_ready():
                raise EngineDeadError(self._loop.not_ready_reason)
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            if self.metrics is not None:  # under the lock: on_dead cannot run between this and registering
                self.metrics.on_arrival(request_id, time.monotonic())
            self._streams[request_id] = stream
        try:
            self._loop.add(AddRequest(request_id, ids, params))
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            if self.metrics is not None:
                self.metrics.forget(request_id, None)
            raise
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise item.error
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        with self._lock:
            self._streams.pop(request_id, None)
            self._held.pop(request_id, None)
        if self.metrics is not None:
            self.metrics.forget(request_id, None)  # as vLLM: a caller's abort is no finished request
        self._loop.abort(request_id)

    def stats(self) -> EngineStats:
        """The snapshot published after the latest step (thread-safe)."""
        return self._loop.stats()

    def is_ready(self) -> bool:
        return self._loop.is_ready()

    def check_health(self) -> None:
        """Raises EngineDeadError when the engine cannot recover by itself (call from a thread: with
        tensor parallelism it pings the ranks)."""
        self._loop.check_health()

    def process_ids(self) -> list[int]:
        """The engine process's pid (process mode), or the tensor-parallel ranks' pids; empty otherwise."""
        return self._loop.process_ids()

    def shutdown(self) -> None:
        self._loop.shutdown()

    # ---- the Sink (called from the loop's thread) -------------------------------------------------------
    def on_outputs(self, deltas: list[OutputDelta]) -> None:
        if self.metrics is not None:  # per step, before stream_interval holds or a lagging caller merges
            self.metrics.on_step(deltas, time.monotonic())
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, OutputDelta]]] = {}
        with self._lock:
            for delta in deltas:
                stream = self._streams.get(delta.request_id)
                if stream is None:  # aborted meanwhile
                    self._held.pop(delta.request_id, None)
                    continue
                if self._interval > 1:
                    held = self._hold(delta)
                    if held is None:
                        continue
                    delta = held
                by_loop.setdefault(stream.loop, []).append((stream, delta))
                if delta.finished:
                    del self._streams[delta.request_id]
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that caller's loop is closed: nobody listens any more
                loop.call_soon_threadsafe(_deliver, batch)

    def on_rejected(self, request_id: str, error: EngineError) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if self.metrics is not None:
            self.metrics.forget(request_id, None)  # refused at admission: never a request of the engine's
        if stream is not None:
            stream.put(error)

    def on_dead(self, error: EngineDeadError) -> None:
        with self._lock:
            lost = list(self._streams)
            streams, self._streams = list(self._streams.values()), {}
            self._held.clear()
        if self.metrics is not None:
            for request_id in lost:
                self.metrics.forget(request_id, None)  # lost with the engine process: vLLM counts none either
        if streams:
            logger.error("failing %d requests in flight: %s", len(streams), error.message)
        for stream in streams:
            stream.put(EngineDeadError(error.message))  # one instance per caller: tracebacks are per raise

    def _hold(self, delta: OutputDelta) -> OutputDelta | None:
        """stream_interval > 1: merge a request's deltas until ``interval`` tokens are new; the first token
        and the final delta go at once. None: held for now."""
        held = self._held.pop(delta.request_id, None)
        if held is not None:
            delta = merge_deltas(held, delta)
        first = delta.num_output_tokens == len(delta.token_ids)
        if delta.finished or len(delta.token_ids) >= self._interval or first:
            return delta
        self._held[delta.request_id] = delta
        return None
