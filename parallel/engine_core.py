"""The engine's step loop in a process of its own (the idea of vLLM V1's EngineCore).

In a server process the step loop shares one GIL with the event loop that streams tokens out: every torch op
releases and retakes the GIL, and while the event loop holds it (serialising chunks for many streams) the
step waits, so steps stretch under load. A spawned child owns the model, the KV cache and the scheduler; the
parent keeps only the tokenizer (to validate prompts at once) and talks over a pipe:

- parent -> child: ``("add", (request_id, prompt, params))``, ``("abort", request_id)``, ``("stop", None)``;
- child -> parent: ``("outputs", ([OutputDelta...], EngineStats))`` after every step, ``("rejected",
  (request_id, message))`` for a request the engine refused, ``("stats", EngineStats)`` when it goes idle,
  ``("dead", message)`` when a step failed.

Only deltas cross the pipe (new token ids, new text, new logprobs); the parent rebuilds vLLM-shaped
cumulative outputs, so the bytes per step do not grow with the length of the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from parallel.config import EngineConfig
from parallel.outputs import CompletionOutput, RequestOutput, cumulative_logprob

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputDelta:
    """What one step added to one request."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: tuple[dict[int, float], ...] | None
    num_cached_tokens: int


def to_delta(out: RequestOutput) -> OutputDelta:
    c = out.outputs[0]
    n = len(c.delta_token_ids)
    lps = c.logprobs[len(c.logprobs) - n:] if c.logprobs is not None else None
    return OutputDelta(out.request_id, c.delta_token_ids, c.delta_text, out.finished, c.finish_reason,
                       c.stop_reason, lps, out.num_cached_tokens)


@dataclass
class OutputAccumulator:
    """Parent side: one request's cumulative output, rebuilt from deltas."""

    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    want_logprobs: bool
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)

    def add(self, d: OutputDelta) -> RequestOutput:
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        lps = tuple(self.logprobs) if self.want_logprobs else None
        completion = CompletionOutput(
            index=0, text=self.text, token_ids=tuple(self.token_ids), finish_reason=d.finish_reason,
            delta_text=d.text, delta_token_ids=d.token_ids, logprobs=lps,
            cumulative_logprob=cumulative_logprob(lps, self.token_ids),
            stop_reason=d.stop_reason)
        return RequestOutput(d.request_id, self.prompt, self.prompt_token_ids, (completion,), d.finished,
                             d.num_cached_tokens)


def _core_main(config: EngineConfig, conn: Connection) -> None:
    """The child: build the engine, then serve commands and step until told to stop or the parent is gone."""
    from parallel.engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException as err:  # reported to the parent, which raises it
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    eos = list(engine.eos_token_ids)
    conn.send(("ready", {"max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
                         "eos_token_ids": eos, "stats": engine.stats()}))
    try:
        _serve(engine, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone: nothing left to serve
    finally:
        engine.shutdown()


def _serve(engine: Any, conn: Connection) -> None:
    busy = False
    while True:
        timeout = 0.0 if engine.has_unfinished() else 1.0
        while conn.poll(timeout):
            kind, payload = conn.recv()
            timeout = 0.0
            if kind == "stop":
                return
            if kind == "add":
                request_id, prompt, params = payload
                try:
                    engine.add_request(request_id, prompt, params)
                except ValueError as err:
                    conn.send(("rejected", (request_id, str(err))))
            elif kind == "abort":
                engine.abort(payload)
        if not engine.has_unfinished():
            if busy:  # went idle: publish the final numbers once (blocks freed, nothing running)
                conn.send(("stats", engine.stats()))
                busy = False
            continue
        busy = True
        try:
            outputs = engine.step()
        except Exception as err:  # a bug or a device failure: tell the parent, which fails every stream
            logger.exception("engine step failed")
            conn.send(("dead", f"{type(err).__name__}: {err}"))
            return
        conn.send(("outputs", ([to_delta(o) for o in outputs], engine.stats())))


class EngineCoreClient:
    """Starts the engine in a spawned child process and relays commands and step results.

    Example:
        >>> core = EngineCoreClient(EngineConfig.from_options("models/tiny-code-llama"))
        >>> core.send("add", ("r1", "def f():", SamplingParams(max_tokens=4)))
        >>> kind, payload = core.recv()  # ("outputs", ([OutputDelta(...)], EngineStats(...)))
    """

    def __init__(self, config: EngineConfig, start_timeout_s: float = 600.0) -> None:
        from parallel.tokenizer import Tokenizer

        self.config = config
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds Ray's or torch's threads
        self._conn, child = ctx.Pipe()
        self._send_lock = threading.Lock()
        self.process = ctx.Process(target=_core_main, args=(config, child), name="modelfleet-engine-core",
                                   daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self.process.kill()
            raise RuntimeError(f"engine process did not start within {start_timeout_s:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError as err:
            raise RuntimeError(f"engine process exited during start-up (exit code {self.process.exitcode})") from err
        if kind == "failed":
            self.process.join(timeout=10)
            raise RuntimeError(f"engine process failed to start: {payload}")
        self.max_model_len: int = payload["max_model_len"]
        self.vocab_size: int = payload["vocab_size"]
        self.initial_stats = payload["stats"]
        mc = config.model
        self.tokenizer = None if mc.skip_tokenizer_init else Tokenizer.from_folder(mc.path, payload["eos_token_ids"])

    def send(self, kind: str, payload: Any) -> None:
        with self._send_lock:  # callers on several threads (event loop, health checks) share one pipe
            self._conn.send((kind, payload))

    def poll(self, timeout: float) -> bool:
        return self._conn.poll(timeout)

    def recv(self) -> tuple[str, Any]:
        return self._conn.recv()

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def shutdown(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send("stop", None)
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self._conn.close()
