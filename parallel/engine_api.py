"""The one interface a serving replica sees, whichever engine runs behind it.

The native engine's client (``async_engine.AsyncEngine``: a thread or a child process running
``engine.LLMEngine``) and the vLLM adapter (``vllm_engine.VllmEngine``) both implement ``Engine``; the Serve
replica (``deployments/llm.py``) touches nothing behind it. Outputs are ``OutputDelta``s: what is new since
the previous item of the same request, never the whole output so far (accumulate once, where a full
response is needed). Errors are the typed classes of ``parallel.errors``.

Example:
    >>> engine: Engine = AsyncEngine.from_options("models/tiny-code-llama")   # doctest: +SKIP
    >>> ids = engine.encode_prompt("def f():")                                  # doctest: +SKIP
    >>> async for d in engine.generate("r1", ids, SamplingParams(max_tokens=4)):  # doctest: +SKIP
    ...     print(d.text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from parallel.engine_stats import EngineStats
from parallel.outputs import OutputDelta
from parallel.sampling_params import SamplingParams
from parallel.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineInfo:
    """Static facts of a running engine."""

    engine: str  # "native" or "vllm"
    max_model_len: int
    vocab_size: int


@runtime_checkable
class Engine(Protocol):
    """generate / abort / stats / info / health, for one model on one replica."""

    tokenizer: Tokenizer | None

    @property
    def info(self) -> EngineInfo: ...

    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Validate and tokenize; thread-safe and possibly slow (call it off the event loop). Raises
        ``InvalidRequestError`` / ``ContextLengthError`` naming ``param``."""
        ...

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[OutputDelta]:
        """Deltas of one request; the last has ``finished=True``. Raises ``InvalidRequestError`` for a request the
        engine refuses, ``RequestFailedError`` when this request failed inside the engine, ``EngineDeadError``
        when the engine is gone. Leaving the iteration early aborts the request (its KV blocks are freed)."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats:
        """The latest snapshot (thread-safe, no I/O)."""
        ...

    def is_ready(self) -> bool:
        """True when a request sent now can be served (False while a dead engine process restarts)."""
        ...

    def check_health(self) -> None:
        """Raises ``EngineDeadError`` when the engine cannot recover by itself (the replica must be replaced)."""
        ...

    def process_ids(self) -> list[int]:
        """Process ids of the engine's own processes (engine process, tensor-parallel ranks); for operators
        and fault-injection tests. Empty when the engine runs in the caller's process."""
        ...

    def shutdown(self) -> None: ...
