"""The messages between the serving process and its engine process: a kind from ``Msg`` and one payload.

Every message on the pipe is a ``(Msg, payload)`` pair; payloads of more than one value are frozen
dataclasses, errors are the typed exceptions of ``parallel.errors`` (they pickle with their fields).

    parent -> child   ADD(AddRequest)  ABORT(request id)  STOP(None)
    child -> parent   READY(Ready)  FAILED(exception)  OUTPUTS(StepOutputs)  STATS(EngineStats)
                      REJECTED(Rejected)  DEAD(reason)

Example:
    >>> conn.send((Msg.ADD, AddRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4))))   # doctest: +SKIP
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from parallel.engine_stats import EngineStats
from parallel.errors import EngineError
from parallel.outputs import OutputDelta
from parallel.sampling_params import SamplingParams


class Msg(enum.Enum):
    ADD = "add"  # AddRequest: admit a request (already tokenized and validated by the parent)
    ABORT = "abort"  # str: stop a request, free its blocks
    STOP = "stop"  # None: shut down
    READY = "ready"  # Ready: the engine is built
    FAILED = "failed"  # Exception: the engine could not be built (start-up only)
    OUTPUTS = "outputs"  # StepOutputs: after every step
    STATS = "stats"  # EngineStats: once when the engine goes idle (the final numbers)
    REJECTED = "rejected"  # Rejected: a request the engine refused at admission
    DEAD = "dead"  # str: the engine is broken (steps keep failing); the process exits after sending it


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Ready:
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    stats: EngineStats


@dataclass(frozen=True)
class StepOutputs:
    deltas: list[OutputDelta]
    stats: EngineStats


@dataclass(frozen=True)
class Rejected:
    request_id: str
    error: EngineError  # an InvalidRequestError (or subclass) naming the field; RequestFailedError otherwise
