"""LLMServer: one Serve replica holding one engine (native or vLLM) behind ``parallel.engine_api.Engine``.

It receives a ``GenerateRequest`` and streams ``Chunk``s (deltas), or one final ``ErrorInfo`` when the
request is refused or fails. On the way in: admission (refuse at once what would wait too long), prompt
rendering and tokenisation off the event loop (a 4 MiB prompt must not freeze other streams), the context
check. Engine errors are mapped by class: the client's mistake 400, a failure of this request alone 500,
a dead or restarting engine 503 with Retry-After (the router retries once elsewhere). A caller that stops
iterating (a client that disconnects) cancels the generator here, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import (
    metrics,  # through the module: Serve pickles this class by value, a metric holds a lock
    tracing,
)
from deployments.admission import AdmissionLimits, LoadTracker, decide
from deployments.direct import DirectListener, DirectOptions
from deployments.fanout import merge
from deployments.logprobs import Render
from deployments.messages import Chunk, ErrorInfo, GenerateRequest, ServeError, as_request
from deployments.stats_line import stats_line
from deployments.telemetry import Observability, Telemetry, app_version
from parallel.chat_template import render_chat
from parallel.engine_api import Engine
from parallel.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestFailedError,
)
from parallel.fanout import child_params
from parallel.gpu import GpuMonitor, engine_load_metrics
from parallel.sampling_params import SamplingParams

logger = logging.getLogger("ray.serve")


def make_engine(engine: str, source: str, options: dict[str, Any], draft: DeploymentHandle | None = None) -> Engine:
    if engine == "vllm":
        from parallel.vllm_engine import VllmEngine

        return VllmEngine(source, **options)
    from parallel.async_engine import AsyncEngine

    if draft is not None:  # speculative decoding with the draft in its own deployment
        from deployments.draft import remote_proposer

        return AsyncEngine.from_options(source, proposer=remote_proposer(draft), external_draft=True, **options)
    return AsyncEngine.from_options(source, **options)


def error_info(err: Exception, model: str, retry_after_s: float) -> ErrorInfo:
    """The client-facing error for an engine error, by class."""
    if isinstance(err, InvalidRequestError):
        return ErrorInfo(400, err.message, param=err.param, code=err.code)
    if isinstance(err, EngineOverloadedError):
        return ErrorInfo(503, err.message, code="overloaded", retry_after_s=err.retry_after_s)
    if isinstance(err, EngineDeadError):
        return ErrorInfo(503, f"model {model!r}: its engine failed ({err.message}); it is being restarted, retry",
                         code="replica_failed", retry_after_s=retry_after_s)
    if isinstance(err, RequestFailedError):
        return ErrorInfo(500, f"this request failed inside the engine: {err.message}", code="request_failed")
    raise err


@serve.deployment
class LLMServer:
    """A model replica. Python callers use ``generate`` (unary) or ``generate_stream`` (``stream=True``)
    with a ``GenerateRequest`` (or the same as a dict).

    Example:
        >>> h = serve.get_deployment_handle("tiny-code-llama", app_name="modelfleet")
        >>> h.generate.remote({"prompt": "def f():", "params": {"max_tokens": 8, "temperature": 0}}).result().text
    """

    def __init__(self, model_name: str, source: str, engine: str = "native",
                 engine_options: dict[str, Any] | None = None, draft: DeploymentHandle | None = None,
                 admission: AdmissionLimits | None = None, retry_after_s: float = 1.0,
                 direct: DirectOptions | None = None, front: DeploymentHandle | None = None,
                 observability: Observability | None = None, version: str = "", sha256: str = "") -> None:
        self.model_name, self.version, self.sha256 = model_name, app_version(version), sha256
        version = self.version
        obs = observability or Observability()
        options = {**(engine_options or {}), "served_model_name": model_name}
        if not obs.metrics:
            options["disable_log_stats"] = True
        self.engine: Engine = make_engine(engine, source, options, draft)
        self.tokenizer = self.engine.tokenizer
        self.render = Render(self.tokenizer)
        self.max_model_len = self.engine.info.max_model_len
        self.admission = admission or AdmissionLimits()
        self.retry_after_s = retry_after_s
        slots = int((engine_options or {}).get("max_num_seqs") or 32)
        self.load = LoadTracker(slots)
        self._ids = itertools.count()
        # NVML only where this replica runs its engine on a GPU; elsewhere the GPU signal is absent (not 0).
        self.gpu = GpuMonitor() if torch.cuda.is_available() else None
        if self.gpu is not None and obs.metrics:
            metrics.watch_gpu(model_name, self.gpu.read)
        metrics.watch_restarts(model_name, lambda: int(getattr(getattr(self.engine, "_loop", None), "num_restarts",
                                                                0) or 0))
        self.telemetry = Telemetry.start(obs, "direct", model_name, version)
        self._stats_task = None
        if obs.stats_interval_s > 0 and self.engine.info.engine == "native":  # vLLM logs its own line
            self._stats_task = asyncio.get_running_loop().create_task(self._log_stats(obs.stats_interval_s))
        self.direct: DirectListener | None = None
        self._front, self._heartbeat = front, None
        if direct is not None:  # the hop-free path: this replica answers HTTP for its model itself
            import ray

            host = ray.util.get_node_ip_address() if direct.host == "node" else direct.host
            self.direct = DirectListener(model_name, self.generate_stream, direct.limits, self.engine.is_ready,
                                         self.telemetry.observer, direct.gateway, self.max_model_len)
            self.direct.start(host)
            if front is not None:
                self._heartbeat = asyncio.get_running_loop().create_task(self._announce(front, host))
        logger.info("model %s ready on the %s engine (max_model_len %d)", model_name, engine, self.max_model_len)

    # ---- Serve hooks ------------------------------------------------------------------------------------
    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve pulls these for cluster.autoscaling.decide: queue depth, running, KV usage, GPU readings."""
        return engine_load_metrics(self.engine.stats(), self.gpu.read() if self.gpu is not None else None)

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica (and so all its ranks).
        An engine process that died and is restarting in place is not a reason: it is back in seconds."""
        await asyncio.to_thread(self.engine.check_health)

    async def __del__(self) -> None:
        """Serve's graceful shutdown (scale-down, redeploy): leave the front, let the listener's requests
        finish (its /health turns 503 at once), then close it. Serve waits graceful_shutdown_timeout_s (20 s)."""
        for task in (self._heartbeat, self._stats_task):
            if task is not None:
                task.cancel()
        if self.direct is not None:
            if self._front is not None:
                try:
                    await asyncio.wait_for(self._front.unregister.remote(self.model_name, self._key()), timeout=2)
                except Exception as err:  # the front is gone too (the app is being deleted): nothing to leave
                    logger.info("model %s: could not leave the front proxy (%s)", self.model_name,
                                type(err).__name__)
            await self.direct.stop(drain_s=15.0)
        await self.telemetry.stop()  # last: the drained requests' counts, log lines and spans go out too

    async def _log_stats(self, every_s: float) -> None:
        """vLLM's periodic stats line, for the native engine: only while busy."""
        prev, at = self.engine.stats(), time.monotonic()
        while True:
            await asyncio.sleep(every_s)
            cur, now = self.engine.stats(), time.monotonic()
            line = stats_line(self.model_name, prev, cur, now - at)
            if line is not None:
                logger.info("%s", line)
            prev, at = cur, now

    @staticmethod
    def _key() -> str:
        return serve.get_replica_context().replica_id.unique_id

    async def _announce(self, front: DeploymentHandle, host: str) -> None:
        """Tell the front proxy where this replica listens, and keep telling it (it forgets the silent)."""
        assert self.direct is not None and self.direct.port is not None
        key = self._key()
        while True:
            try:
                await front.register.remote(self.model_name, key, host, self.direct.port)
            except Exception as err:  # the front is restarting: the next beat tells the new one
                logger.warning("model %s: cannot reach the front proxy (%s)", self.model_name, type(err).__name__)
            await asyncio.sleep(ANNOUNCE_EVERY_S)

    # ---- API --------------------------------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        return {"name": self.model_name, "engine": self.engine.info.engine, "max_model_len": self.max_model_len,
                "ready": self.engine.is_ready(), "direct_port": self.direct.port if self.direct else None,
                "version": self.version, "sha256": self.sha256}

    async def stats(self) -> dict[str, Any]:
        load = self.load.snapshot()
        return {**dataclasses.asdict(self.engine.stats()), "admission_queued": load.queued,
                "admission_running": load.running}

    async def tokenize(self, request: GenerateRequest | dict[str, Any]) -> dict[str, Any] | ErrorInfo:
        """vLLM's /tokenize: the ids generation would see for this prompt or chat (rendered by the template)."""
        req = as_request(request)
        try:
            ids = self._prompt_ids(req) if _small(req) else await asyncio.to_thread(self._prompt_ids, req)
        except EngineError as err:
            return error_info(err, self.model_name, self.retry_after_s)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    async def detokenize(self, ids: list[int]) -> dict[str, Any] | ErrorInfo:
        """vLLM's /detokenize: the text of these ids (special tokens kept, as vLLM does)."""
        vocab = self.engine.info.vocab_size
        if self.tokenizer is None or any(not 0 <= t < vocab for t in ids):
            return ErrorInfo(400, f"tokens must be ids in [0, {vocab})" if self.tokenizer is not None else
                             "this model was started without a tokenizer", param="tokens", code="invalid_value")
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, list(ids), False)}

    async def worker_pids(self) -> list[int]:
        """Process ids of the engine's processes (engine process, tensor-parallel ranks); for operators and
        fault-injection tests."""
        return await asyncio.to_thread(self.engine.process_ids)

    async def pids(self) -> dict[str, Any]:
        """This replica's process id and its engine's (for fault-injection tests and operators)."""
        return {"replica": os.getpid(), "engine": await asyncio.to_thread(self.engine.process_ids),
                "ready": self.engine.is_ready()}

    async def generate(self, request: GenerateRequest | dict[str, Any]) -> Chunk | ErrorInfo:
        """The whole completion as one Chunk (text and token ids accumulated once), or the ErrorInfo."""
        choices: dict[int, list[Chunk]] = {}
        async for item in self.generate_stream(request):
            if isinstance(item, ErrorInfo):
                return item
            choices.setdefault(item.index, []).append(item)
        whole = [_joined(choices[i]) for i in sorted(choices)]
        return whole[0] if len(whole) == 1 else tuple(whole)  # type: ignore[return-value]

    async def generate_stream(self, request: GenerateRequest | dict[str, Any]) -> AsyncIterator[Chunk | ErrorInfo]:
        try:
            req = as_request(request)
        except InvalidRequestError as err:
            yield error_info(err, self.model_name, self.retry_after_s)
            return
        refusal = self._admit(req)  # once per request, whatever its number of sequences
        if refusal is not None:
            yield refusal
            return
        if not req.fans_out:
            async for item in self._one(req):
                yield item
            return
        # n samples of each prompt (best_of candidates): one engine request each, merged (deployments/fanout.py)
        p = req.params
        prompts = req.prompts or ((req.prompt,) if req.messages is None else (None,))
        sequences = [(i, j, self._one(dataclasses.replace(req, request_id=f"{req.request_id}.{i}.{j}", prompt=prompt,
                                                            prompts=(), params=child_params(p, j))))
                     for i, prompt in enumerate(prompts) for j in range(p.num_sequences)]
        async for item in merge(sequences, p):
            yield item

    def _admit(self, req: GenerateRequest) -> ErrorInfo | None:
        """Refuse at once what would wait too long (or cannot run: an engine restarting); None: admitted."""
        if req.admitted_at is not None:
            metrics.ROUTER_QUEUE.labels(self.model_name).observe(max(0.0, time.time() - req.admitted_at))
        if not self.engine.is_ready():
            return ErrorInfo(503, f"model {self.model_name!r}: its engine is restarting, retry",
                             code="engine_restarting", retry_after_s=self.retry_after_s)
        time_left = req.deadline - time.time() if req.deadline is not None else None
        decision = decide(self.load.snapshot(), self.admission, time_left)
        if not decision.admit:
            logger.info("request %s refused: %s", req.request_id, decision.reason)
            return ErrorInfo(503, f"model {self.model_name!r} is overloaded: {decision.reason}; retry later",
                             code="overloaded", retry_after_s=decision.retry_after_s)
        return None

    async def _one(self, req: GenerateRequest) -> AsyncIterator[Chunk | ErrorInfo]:
        """One admitted sequence: rendering and tokenising, the engine's deltas as Chunks."""
        rid = req.request_id
        arrived = time.monotonic()
        self.load.enqueue()
        started_at: float | None = None
        scheduled = last = None
        span = tracing.child_span("replica.generate", req.traceparent, {tracing.GEN_AI_REQUEST_MODEL: self.model_name,
                                  tracing.REQUEST_ID: rid}, activate=False).__enter__() if req.traceparent else None
        try:
            # A large prompt is rendered and tokenised in a worker thread (seconds of CPU must not freeze other
            # streams); a small one inline, where the thread hop would cost more than the work.
            ids, params = (self._prepare(req) if _small(req) else await asyncio.to_thread(self._prepare, req))
            want_lps = params.logprobs is not None
            echo: dict[str, Any] = {}
            if req.echo:  # the prompt as text, and its logprobs when asked (vLLM's echo)
                echo["prompt_text"] = req.prompt if isinstance(req.prompt, str) else self.render.text(ids)
            # The engine's id is unique even when clients reuse an x-request-id; logs carry the client's.
            async for d in self.engine.generate(f"{rid}#{next(self._ids)}", ids, params):
                queue_s = None
                if started_at is None:
                    started_at = time.monotonic()
                    self.load.start()
                    scheduled = d.scheduled_at
                    queue_s = max(0.0, scheduled - arrived) if scheduled is not None else None
                if span is not None:
                    last = time.monotonic()
                if echo and d.prompt_logprobs is not None:
                    echo["prompt_logprobs"] = self.render.prompt(ids, d.prompt_logprobs)
                if req.echo_only:  # max_tokens 0: the one token computed is not the client's
                    yield Chunk("", (), "length" if d.finished else None, d.num_prompt_tokens, 0, None, queue_s,
                                **echo)
                else:
                    lps = self.render.tokens(d.logprobs or (), d.token_ids) if want_lps and d.token_ids else None
                    yield Chunk(d.text, d.token_ids, d.finish_reason, d.num_prompt_tokens, d.num_output_tokens,
                                lps, queue_s, **echo)
                echo = {}
        except ServeError as err:
            yield err.info
        except (InvalidRequestError, EngineOverloadedError, EngineDeadError, RequestFailedError) as err:
            info = error_info(err, self.model_name, self.retry_after_s)
            (logger.warning if info.status >= 500 else logger.info)("request %s failed: %s %s", rid, info.status,
                                                                     info.message)
            yield info
        finally:
            self.load.finish(started_at is not None,
                             time.monotonic() - started_at if started_at is not None else None)
            if span is not None:  # the engine's phases, from this process's monotonic clock (the engine's too)
                tracing.record_phases(span.traceparent, [("engine.queued", arrived, scheduled),
                                                         ("engine.prefill", scheduled, started_at),
                                                         ("engine.decode", started_at, last)])
                span.__exit__(None, None, None)

    # ---- helpers (run in a worker thread: tokenising a large prompt takes seconds) ----------------------
    def _prepare(self, req: GenerateRequest) -> tuple[list[int], SamplingParams]:
        ids = self._prompt_ids(req)
        params = req.params
        room = self.max_model_len - len(ids)
        if req.fill_max_tokens:
            params = dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
        elif params.max_tokens > room:
            raise ContextLengthError(f"this model's maximum context length is {self.max_model_len} tokens, but "
                                     f"{len(ids)} prompt tokens plus max_tokens={params.max_tokens} exceed it",
                                     param="max_tokens")
        return ids, params

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages is None:
            prompt = req.prompt if isinstance(req.prompt, str) else list(req.prompt or ())
            return self.engine.encode_prompt(prompt, param="prompt")
        tok = self.tokenizer
        if tok is None:
            raise InvalidRequestError("chat needs a tokenizer; this model was started without one", param="messages")
        try:
            text = render_chat([m.for_template() for m in req.messages], tok.chat_template, tok.bos_token,
                               tok.eos_token, tools=json.loads(req.tools) if req.tools else None)
        except ValueError as err:  # the template refused the conversation (e.g. roles out of order)
            raise InvalidRequestError(str(err), param="messages") from None
        bound = tok.min_tokens(text)
        if bound >= self.max_model_len:  # refused before tokenising: no amount of CPU would make it fit
            raise ContextLengthError(f"messages have at least {bound} tokens, more than the model's context length "
                                     f"{self.max_model_len}", param="messages")
        ids = tok.encode(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token)))
        return self.engine.encode_prompt(ids, param="messages")


def _joined(chunks: list[Chunk]) -> Chunk:
    """One choice's chunks as one (the counts of the last: the request's totals)."""
    first, last = chunks[0], chunks[-1]
    lps = [e for c in chunks for e in (c.logprobs or ())]
    return dataclasses.replace(last, text="".join(c.text for c in chunks),
                               token_ids=tuple(t for c in chunks for t in c.token_ids),
                               logprobs=tuple(lps) if lps else None, queue_s=first.queue_s,
                               prompt_text=first.prompt_text, prompt_logprobs=first.prompt_logprobs)


ANNOUNCE_EVERY_S = 3.0  # the front drops a listener not heard of for 15 s
INLINE_CHARS = 8192  # tokenising this much takes well under a millisecond


def _small(req: GenerateRequest) -> bool:
    if req.messages is not None:
        return sum(len(m.content) for m in req.messages) <= INLINE_CHARS
    return len(req.prompt or ()) <= INLINE_CHARS
