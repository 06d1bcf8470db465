"""Calling a model replica for one generation, and what to do when it fails.

- Admission at once: Serve's BackPressureError and a replica's own refusal (queue too long or too slow)
  are 503s with Retry-After, answered as soon as they are known.
- A replica that dies before it produced output is retried once (Serve routes the retry to a live replica);
  after output has reached the client, a stream ends with an error event and ``[DONE]``, a unary request
  with 503 + Retry-After, never a silently truncated 200 or a 500.
- ``deadline`` (router.request_timeout_s) bounds the whole request: past it the generation is cancelled
  (which aborts it in the engine) and the client gets 504 ``timeout`` or a final error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from deployments.messages import Chunk, ErrorInfo, GenerateRequest, ServeError, unavailable

logger = logging.getLogger("ray.serve")

# A replica (or its node) went away under the call: the request may be retried elsewhere.
REPLICA_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)
# Replica error codes for which nothing was generated and another replica may succeed.
RETRYABLE_CODES = frozenset({"replica_failed", "engine_restarting"})


@dataclass(frozen=True)
class CallPolicy:
    retry_after_s: float = 1.0
    cold_start_timeout_s: float = 120.0  # wait for a first item while a model scales from zero


def timeout_error(request_id: str) -> ErrorInfo:
    return ErrorInfo(504, f"request {request_id} passed its deadline (router.request_timeout_s)", code="timeout")


def _gone(model: str, policy: CallPolicy, err: BaseException) -> ServeError:
    return unavailable(f"model {model!r}: its replica failed while answering ({type(err).__name__}); retry",
                       "replica_failed", policy.retry_after_s)


class ReplicaStream:
    """One generation's chunks from a replica; ``first`` is already read (so refusals surface before any
    response starts)."""

    def __init__(self, handle: DeploymentHandle, request: GenerateRequest, policy: CallPolicy) -> None:
        self.handle, self.request, self.policy = handle, request, policy
        self._stream: Any = None
        self.first: Chunk | None = None

    async def start(self) -> Chunk:
        """Send the request and wait for its first chunk (retrying once where nothing was produced)."""
        req, policy = self.request, self.policy
        for attempt in (1, 2):
            self._stream = self.handle.options(stream=True).generate_stream.remote(req)
            remaining = (req.deadline - time.time()) if req.deadline is not None else policy.cold_start_timeout_s
            try:
                first = await asyncio.wait_for(self._stream.__anext__(),
                                               timeout=max(0.0, min(policy.cold_start_timeout_s, remaining)))
            except BackPressureError as err:
                raise unavailable(f"model {req.model!r} is overloaded, retry later", "overloaded",
                                  policy.retry_after_s) from err
            except TimeoutError as err:
                self.cancel()
                if req.deadline is not None and time.time() >= req.deadline:
                    raise ServeError(timeout_error(req.request_id)) from err
                raise unavailable(f"model {req.model!r} did not start answering within "
                                  f"{policy.cold_start_timeout_s:.0f} s (scaling up?); retry", "unavailable",
                                  policy.retry_after_s) from err
            except StopAsyncIteration as err:
                raise ServeError(ErrorInfo(500, "the replica ended the stream without output",
                                           code="internal_error")) from err
            except REPLICA_GONE as err:
                logger.warning("request %s: replica of %s gone before output (%s), attempt %d", req.request_id,
                               req.model, type(err).__name__, attempt)
                if attempt == 2:
                    raise _gone(req.model, policy, err) from err
                continue
            if isinstance(first, ErrorInfo):
                if first.code in RETRYABLE_CODES and attempt == 1:
                    logger.warning("request %s: %s on a replica of %s, retrying once", req.request_id, first.code,
                                   req.model)
                    continue
                raise ServeError(first)
            self.first = first
            return first
        raise AssertionError("unreachable")

    async def rest(self) -> AsyncIterator[Chunk | ErrorInfo]:
        """The chunks after the first; a failure becomes a final ErrorInfo item (never an exception). The
        deadline bounds each wait for the replica, never a yield (a slow reader is the caller's to handle)."""
        req, deadline = self.request, loop_deadline(self.request.deadline)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await self._stream.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    yield timeout_error(req.request_id)
                    return
                except (*REPLICA_GONE, RequestCancelledError) as err:
                    logger.warning("request %s: replica of %s failed mid-stream (%s)", req.request_id, req.model,
                                   type(err).__name__)
                    yield _gone(req.model, self.policy, err).info
                    return
                yield item
                if isinstance(item, ErrorInfo):
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self._stream is not None:
            self._stream.cancel()  # a client that left, or a deadline: abort the generation, free its blocks


def loop_deadline(deadline: float | None) -> float | None:
    """A wall-clock deadline as a time of the running loop's clock."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.time())


async def generate_whole(handle: DeploymentHandle, request: GenerateRequest, policy: CallPolicy,
                         first: Callable[[], None] | None = None) -> list[Chunk]:
    """All chunks of a unary request. Nothing has reached the client yet, so a replica death anywhere is
    retried once as a whole. ``first``: called when the first chunk arrives (its time is the TTFT)."""
    for attempt in (1, 2):
        stream = ReplicaStream(handle, request, policy)
        chunks = [await stream.start()]
        if first is not None:
            first()
        async for item in stream.rest():
            if isinstance(item, ErrorInfo):
                if item.code in RETRYABLE_CODES and attempt == 1:
                    break
                raise ServeError(item)
            chunks.append(item)
        else:
            return chunks
    raise unavailable(f"model {request.model!r}: its replicas failed twice; retry", "replica_failed",
                      policy.retry_after_s)
