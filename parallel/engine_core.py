"""The engine's step loop in a process of its own (the idea of vLLM V1's EngineCore).

In a server process the step loop shares one GIL with the event loop that streams tokens out: every torch op
releases and retakes the GIL, and while the event loop holds it (serialising chunks for many streams) the
step waits, so steps stretch under load. A spawned child owns the model, the KV cache and the scheduler; the
parent keeps only the tokenizer (to validate prompts at once) and talks over a pipe in the typed messages of
``parallel.engine_messages``. Only deltas cross the pipe, so the bytes per step do not grow with the length
of the outputs.

The child never dies for one request's sake (``LLMEngine.step`` turns a request's failure into its error
delta); it exits when told to stop, when the parent is gone, or after reporting ``DEAD`` (steps keep failing).
``EngineCoreClient`` is one child's lifetime; ``engine_supervisor.ProcessLoop`` restarts a dead one.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from parallel.config import EngineConfig
from parallel.engine_messages import AddRequest, Msg, Ready, Rejected, StepOutputs
from parallel.errors import EngineDeadError, EngineError, RequestFailedError

logger = logging.getLogger(__name__)


def _portable(err: BaseException) -> BaseException:
    """The error itself when it survives pickling (the parent re-raises the same type), else its text."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def _core_main(config: EngineConfig, conn: Connection) -> None:
    """The child: build the engine, then serve commands and step until told to stop or the parent is gone."""
    from parallel.engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException as err:  # reported to the parent, which raises it
        conn.send((Msg.FAILED, _portable(err)))
        return
    conn.send((Msg.READY, Ready(engine.max_model_len, engine.vocab_size, tuple(engine.eos_token_ids),
                                engine.stats())))
    try:
        _serve(engine, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone: nothing left to serve
    finally:
        engine.shutdown()


def _add(engine: Any, conn: Connection, req: AddRequest) -> None:
    try:
        engine.add_request(req.request_id, req.prompt_ids, req.params)
    except EngineError as err:  # typed: the parent raises it in the caller as is
        conn.send((Msg.REJECTED, Rejected(req.request_id, err)))
    except Exception as err:  # a bug at admission: this request alone fails
        logger.exception("admitting request %s failed", req.request_id)
        failed = RequestFailedError(f"request {req.request_id!r} failed at admission: {type(err).__name__}: {err}")
        conn.send((Msg.REJECTED, Rejected(req.request_id, failed)))


def _serve(engine: Any, conn: Connection) -> None:
    busy = False
    while True:
        timeout = 0.0 if engine.has_unfinished() else 1.0
        while conn.poll(timeout):
            kind, payload = conn.recv()
            timeout = 0.0
            if kind is Msg.STOP:
                return
            if kind is Msg.ADD:
                _add(engine, conn, payload)
            elif kind is Msg.ABORT:
                engine.abort(payload)
        if not engine.has_unfinished():
            if busy:  # went idle: publish the final numbers once (blocks freed, nothing running)
                conn.send((Msg.STATS, engine.stats()))
                busy = False
            continue
        busy = True
        deltas = engine.step()  # never raises for a request's sake: failures are error deltas
        conn.send((Msg.OUTPUTS, StepOutputs(deltas, engine.stats())))
        if not engine.healthy:  # steps keep failing: the device or model is broken; let the parent restart us
            conn.send((Msg.DEAD, "model steps keep failing"))
            return


class EngineCoreClient:
    """One engine child process: spawned at construction (returns once its engine is built), then a pipe.

    ``wait`` wakes when a message arrives *or* the child dies (it waits on the process sentinel too), so a
    SIGKILLed child is noticed at once, not after a poll period.

    Example:
        >>> core = EngineCoreClient(EngineConfig.from_options("models/tiny-code-llama"))
        >>> core.send(Msg.ADD, AddRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4)))
        >>> core.wait(1.0) and core.recv()   # (Msg.OUTPUTS, StepOutputs([OutputDelta(...)], EngineStats(...)))
    """

    def __init__(self, config: EngineConfig, start_timeout_s: float = 600.0,
                 cancel: threading.Event | None = None) -> None:
        self.config = config
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds Ray's or torch's threads
        self._conn, child = ctx.Pipe()
        self._send_lock = threading.Lock()
        self.process = ctx.Process(target=_core_main, args=(config, child), name="modelfleet-engine-core",
                                   daemon=True)
        self.process.start()
        child.close()  # the child holds the only write end left: its death reads as EOF here
        try:
            self.ready = self._wait_ready(start_timeout_s, cancel)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout_s: float, cancel: threading.Event | None) -> Ready:
        deadline = time.monotonic() + timeout_s
        while not self.wait(0.2):
            if cancel is not None and cancel.is_set():
                raise EngineDeadError("engine process start cancelled (shutting down)")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"engine process did not start within {timeout_s:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError as err:
            raise EngineDeadError(f"engine process exited during start-up (exit code {self.exitcode})") from err
        if kind is Msg.FAILED:
            raise payload
        if kind is not Msg.READY:
            raise EngineDeadError(f"engine process sent {kind} before READY")
        return payload

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        self.process.join(timeout=1.0)  # only asked once it is gone: let it be reaped
        return self.process.exitcode

    def send(self, kind: Msg, payload: Any) -> None:
        with self._send_lock:  # callers on several threads (event loops, health checks) share one pipe
            self._conn.send((kind, payload))

    def wait(self, timeout: float) -> bool:
        """True when a message is waiting or the child is gone (then ``recv`` raises EOFError)."""
        return bool(wait([self._conn, self.process.sentinel], timeout))

    def poll(self) -> bool:
        return self._conn.poll(0)

    def recv(self) -> tuple[Msg, Any]:
        return self._conn.recv()

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self._conn.close()

    def shutdown(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send(Msg.STOP, None)
            self.process.join(timeout=10)
        self.kill()
