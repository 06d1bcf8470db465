"""Who runs the engine's step loop for ``AsyncEngine``: the interface of a loop, and the in-process one.

A loop owns the engine (in a thread of this process here; in a child process in
``engine_supervisor.ProcessLoop``) and reports to a ``Sink`` from its own thread: the deltas of each step,
a refused request, or the death of the engine (every request in flight is lost). The loop never dies: a
request's failure is that request's error delta (``LLMEngine.step``), and anything else is logged, fails the
requests in flight and the loop goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol

from parallel.engine import LLMEngine
from parallel.engine_messages import AddRequest
from parallel.engine_stats import EngineStats
from parallel.errors import EngineDeadError, EngineError, RequestFailedError
from parallel.outputs import OutputDelta
from parallel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a loop reports (AsyncEngine). Called from the loop's thread."""

    def on_outputs(self, deltas: list[OutputDelta]) -> None: ...

    def on_rejected(self, request_id: str, error: EngineError) -> None: ...

    def on_dead(self, error: EngineDeadError) -> None:
        """The engine is gone: every request in flight has failed."""
        ...


class EngineLoop(Protocol):
    """What AsyncEngine needs from a loop, in-process or in a child process."""

    tokenizer: Tokenizer | None
    max_model_len: int
    vocab_size: int

    def add(self, request: AddRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def is_ready(self) -> bool: ...

    @property
    def not_ready_reason(self) -> str:
        """Why ``is_ready`` is False (the EngineDeadError message callers get)."""
        ...

    def check_health(self) -> None: ...

    def process_ids(self) -> list[int]: ...

    def shutdown(self) -> None: ...


class ThreadLoop:
    """The step loop in a background thread of this process (torch releases the GIL inside kernels).

    Callers never touch the engine: they post commands to a queue that the loop drains between steps.

    Example:
        >>> loop = ThreadLoop(LLMEngine(EngineConfig.from_options("models/tiny-code-llama")), sink)
        >>> loop.add(AddRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4)))  # deltas go to sink.on_outputs
    """

    def __init__(self, engine: LLMEngine, sink: Sink) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self._sink = sink
        self._commands: queue.SimpleQueue[AddRequest | str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def add(self, request: AddRequest) -> None:
        self._commands.put(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        return self._stats

    def is_ready(self) -> bool:
        return self._thread.is_alive() and not self._stop and self.engine.dead is None

    @property
    def not_ready_reason(self) -> str:
        if self.engine.dead is not None:
            return str(self.engine.dead)
        return "engine is shut down" if self._stop else "engine loop thread is not running"

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop thread is not running")
        try:
            self.engine.check_health()
        except EngineDeadError:
            raise
        except Exception as err:  # a tensor-parallel rank is gone (Ray's error): the replica must go
            raise EngineDeadError(f"engine rank unhealthy: {type(err).__name__}: {err}") from err

    def process_ids(self) -> list[int]:
        return self.engine.process_ids()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, str):
                self.engine.abort(cmd)
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params)
            except EngineError as err:
                self._sink.on_rejected(cmd.request_id, err)
            except Exception as err:  # a bug at admission: this request alone fails
                logger.exception("admitting request %s failed", cmd.request_id)
                self._sink.on_rejected(cmd.request_id, RequestFailedError(
                    f"request {cmd.request_id!r} failed at admission: {type(err).__name__}: {err}"))

    def _run(self) -> None:
        while not self._stop:
            try:
                self._drain()
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                deltas = self.engine.step()
                self._stats = self.engine.stats()
                self._sink.on_outputs(deltas)
            except Exception as err:  # not any one request's: end those in flight, keep the loop
                logger.exception("engine loop iteration failed")
                try:
                    self._sink.on_outputs(self.engine.fail_all(err))
                except Exception:
                    logger.exception("failing the requests in flight failed too")
