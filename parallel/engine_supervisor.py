"""The engine process, supervised: relay its outputs, notice its death at once, restart it in place.

The relay thread waits on the child's pipe *and* its process sentinel, so a SIGKILLed (or OOM-killed)
engine process is noticed the moment it dies: every stream in flight fails with ``EngineDeadError``, the
loop reports not ready (callers get ``EngineDeadError`` at once: a 503 with Retry-After upstream), and a
fresh child with the same config is started in the background. Restarts are bounded (``RestartBudget``):
past it the loop gives up and ``check_health`` raises, so Serve replaces the replica.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from parallel.config import EngineConfig
from parallel.engine_core import EngineCoreClient
from parallel.engine_loop import Sink
from parallel.engine_messages import AddRequest, Msg
from parallel.engine_stats import EngineStats
from parallel.errors import EngineDeadError
from parallel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds (a crash loop is not healed by
    restarting faster).

    Example:
        >>> b = RestartBudget(max_restarts=2, window_s=60)
        >>> [b.allow(t) for t in (0.0, 1.0, 2.0, 61.5)]
        [True, True, False, True]
    """

    max_restarts: int = 3
    window_s: float = 60.0
    _times: collections.deque[float] = field(default_factory=collections.deque, repr=False)

    def allow(self, now: float) -> bool:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True


class ProcessLoop:
    """The step loop in a child process (``engine_core``), relayed by a thread here and restarted when it dies.

    Example:
        >>> loop = ProcessLoop(EngineConfig.from_options("models/tiny-code-llama"), sink)
        >>> loop.add(AddRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4)))  # deltas go to sink.on_outputs
    """

    def __init__(self, config: EngineConfig, sink: Sink, budget: RestartBudget | None = None,
                 start_timeout_s: float = 600.0) -> None:
        self.config = config
        self._sink = sink
        self._budget = budget or RestartBudget()
        self._start_timeout_s = start_timeout_s
        self._stop = threading.Event()
        core = EngineCoreClient(config, start_timeout_s, cancel=self._stop)  # the first start fails loudly
        ready = core.ready
        self.max_model_len = ready.max_model_len
        self.vocab_size = ready.vocab_size
        mc = config.model
        self.tokenizer = None if mc.skip_tokenizer_init else Tokenizer.from_folder(mc.path, ready.eos_token_ids)
        self._core = core
        self._stats: EngineStats = ready.stats
        self._ready = True
        self._fatal: EngineDeadError | None = None
        self.num_restarts = 0
        self._thread = threading.Thread(target=self._relay, name="engine-relay", daemon=True)
        self._thread.start()

    # ---- EngineLoop -------------------------------------------------------------------------------------
    def add(self, request: AddRequest) -> None:
        self._send(Msg.ADD, request)

    def abort(self, request_id: str) -> None:
        self._send(Msg.ABORT, request_id)

    def _send(self, kind: Msg, payload: object) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):  # a dead child is the relay's to report
            self._core.send(kind, payload)

    def stats(self) -> EngineStats:
        return self._stats

    def is_ready(self) -> bool:
        return self._ready and not self._stop.is_set()

    def check_health(self) -> None:
        """Raises only when restarts are exhausted; a restart in progress is healthy (not ready)."""
        if self._fatal is not None:
            raise self._fatal

    @property
    def not_ready_reason(self) -> str:
        if self._fatal is not None:
            return self._fatal.message
        return "engine process is restarting" if not self._stop.is_set() else "engine is shut down"

    def process_ids(self) -> list[int]:
        core = self._core
        return [core.pid] if self._ready and core.pid is not None else []

    def shutdown(self) -> None:
        self._stop.set()
        self._ready = False
        self._core.shutdown()
        self._thread.join(timeout=15)
        self._core.shutdown()  # idempotent; covers a child that a restart swapped in meanwhile

    # ---- the relay thread -------------------------------------------------------------------------------
    def _relay(self) -> None:
        while not self._stop.is_set():
            reason = self._pump(self._core)
            if self._stop.is_set():
                return
            self._on_death(reason)
            if not self._restart():
                return

    def _pump(self, core: EngineCoreClient) -> str:
        """Relay the child's messages until it dies (or we stop); returns why it is gone."""
        while not self._stop.is_set():
            try:
                if not core.wait(0.5):
                    continue
                while core.poll():
                    kind, payload = core.recv()
                    if kind is Msg.DEAD:
                        return f"engine process gave up: {payload}"
                    self._handle(kind, payload)
                if not core.is_alive():
                    return f"engine process exited (exit code {core.exitcode})"
            except (EOFError, OSError):
                return f"engine process exited (exit code {core.exitcode})"
        return "stopped"

    def _handle(self, kind: Msg, payload: Any) -> None:
        try:
            if kind is Msg.OUTPUTS:
                self._stats = payload.stats
                self._sink.on_outputs(payload.deltas)
            elif kind is Msg.STATS:
                self._stats = payload
            elif kind is Msg.REJECTED:
                self._sink.on_rejected(payload.request_id, payload.error)
        except Exception:  # a bug on this side must not stop the relay (the streams would hang)
            logger.exception("relaying %s failed", kind)

    def _on_death(self, reason: str) -> None:
        self._ready = False  # before failing streams: no new request may join the dead child after this
        self._core.kill()
        self._stats = dataclasses.replace(self._stats, num_waiting=0, num_running=0, kv_blocks_used=0, kv_usage=0.0)
        logger.error("%s: failing the requests in flight and restarting it", reason)
        self._sink.on_dead(EngineDeadError(f"{reason}; the engine is restarting"))

    def _restart(self) -> bool:
        """Start a fresh child in place; False when the budget is spent (or we stop)."""
        while not self._stop.is_set():
            if not self._budget.allow(time.monotonic()):
                b = self._budget
                self._fatal = EngineDeadError(f"engine process died more than {b.max_restarts} times within "
                                              f"{b.window_s:.0f} s: giving up (the replica must be replaced)")
                logger.error(self._fatal.message)
                return False
            self.num_restarts += 1
            logger.warning("restarting the engine process (restart %d)", self.num_restarts)
            try:
                core = EngineCoreClient(self.config, self._start_timeout_s, cancel=self._stop)
            except Exception:
                logger.exception("engine process restart %d failed", self.num_restarts)
                continue
            if self._stop.is_set():  # shut down while it started
                core.shutdown()
                return False
            self._core, self._stats = core, core.ready.stats
            self._ready = True
            logger.warning("engine process restarted (pid %s, restart %d)", core.pid, self.num_restarts)
            return True
        return False
