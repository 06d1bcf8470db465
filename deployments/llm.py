"""LLMServer: one Serve replica holding one engine (native or vLLM), streaming plain-data items.

Items cross deployment handles as dicts: ``{"text", "token_ids", "finish_reason", "prompt_tokens",
"completion_tokens", "logprobs"}`` per increment, or one ``{"error", "status"}`` when the request is refused.
A caller that stops iterating (an HTTP client that disconnects) cancels the generator here, which aborts the
engine request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.openai_protocol import OpenAIError
from parallel.chat_template import render_chat
from parallel.gpu import GpuMonitor, engine_load_metrics
from parallel.sampling_params import SamplingParams

logger = logging.getLogger("ray.serve")


def make_engine(engine: str, source: str, options: dict[str, Any], draft: DeploymentHandle | None = None) -> Any:
    if engine == "vllm":
        from parallel.vllm_engine import VllmEngine

        return VllmEngine(source, **options)
    from parallel.async_engine import AsyncEngine

    if draft is not None:  # speculative decoding with the draft in its own deployment
        from deployments.draft import remote_proposer

        return AsyncEngine.from_options(source, proposer=remote_proposer(draft), external_draft=True, **options)
    return AsyncEngine.from_options(source, **options)


def _param_of(message: str) -> str | None:
    for name in ("max_tokens", "temperature", "top_p", "top_k", "logprobs", "min_tokens", "stop", "seed"):
        if message.startswith(name):
            return name
    return None


@serve.deployment
class LLMServer:
    """A model replica. Python callers use ``generate`` (unary) or ``generate_stream`` (``stream=True``).

    Example:
        >>> h = serve.get_deployment_handle("tiny-code-llama", app_name="modelfleet")
        >>> await h.generate.remote({"prompt": "def f():", "sampling": {"max_tokens": 8, "temperature": 0}})
        {'text': ..., 'finish_reason': 'length', 'prompt_tokens': 5, 'completion_tokens': 8, ...}
    """

    def __init__(self, model_name: str, source: str, engine: str = "native",
                 engine_options: dict[str, Any] | None = None, draft: DeploymentHandle | None = None) -> None:
        self.model_name = model_name
        self.engine_kind = engine
        self.engine = make_engine(engine, source, dict(engine_options or {}), draft)
        self.tokenizer = self.engine.tokenizer
        # NVML only where this replica runs its engine on a GPU; elsewhere the GPU signal is absent (not 0).
        self.gpu = GpuMonitor() if torch.cuda.is_available() else None
        logger.info("model %s ready on the %s engine (max_model_len %d)", model_name, engine,
                    self.engine.max_model_len)

    # ---- Serve hooks ------------------------------------------------------------------------------------
    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve pulls these for cluster.autoscaling.decide: queue depth, running, KV usage, GPU readings."""
        return engine_load_metrics(self.engine.stats(), self.gpu.read() if self.gpu is not None else None)

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica (and so all its ranks)."""
        await asyncio.to_thread(self.engine.check_health)

    # ---- API --------------------------------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        return {"name": self.model_name, "engine": self.engine_kind, "max_model_len": self.engine.max_model_len}

    async def stats(self) -> dict[str, Any]:
        stats = dataclasses.asdict(self.engine.stats())
        runner = getattr(getattr(getattr(self.engine, "engine", None), "executor", None), "runner", None)
        remote = getattr(getattr(runner, "proposer", None), "stats", None)
        return {**stats, **remote()} if remote else stats

    async def worker_pids(self) -> list[int]:
        """Process ids of the tensor-parallel ranks (empty for one in-process rank); for operators and tests."""
        executor = getattr(getattr(self.engine, "engine", None), "executor", None)
        pids = getattr(executor, "worker_pids", None)
        return await asyncio.to_thread(pids) if pids else []

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """The whole completion at once: text, token ids, finish reason, usage (or the error item)."""
        text, token_ids, logprobs, last = [], [], [], {}
        async for item in self.generate_stream(request):
            if "error" in item:
                return item
            text.append(item["text"])
            token_ids.extend(item["token_ids"])
            logprobs.extend(item.get("logprobs") or [])
            last = item
        return {**last, "text": "".join(text), "token_ids": token_ids, "logprobs": logprobs or None}

    async def generate_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """request: ``prompt`` (text or ids) or ``messages``, ``sampling`` (SamplingParams fields), optional
        ``logprobs`` (top-n) and ``request_id``."""
        try:
            prompt = self._prompt(request)
            params = self._params(request, prompt)
        except OpenAIError as err:
            yield err.to_item()
            return
        request_id = request.get("request_id") or uuid.uuid4().hex
        n_prompt = len(prompt)
        try:
            async for out in self.engine.generate(request_id, prompt, params):
                c = out.outputs[0]
                n_new = len(c.delta_token_ids)
                yield {"text": c.delta_text, "token_ids": list(c.delta_token_ids), "finish_reason": c.finish_reason,
                       "prompt_tokens": n_prompt, "completion_tokens": len(c.token_ids),
                       "logprobs": self._logprobs(c.logprobs[len(c.logprobs) - n_new:], c.delta_token_ids)
                       if c.logprobs is not None and n_new else None}
        except ValueError as err:  # the engine refused it (e.g. the KV cache cannot hold it): the client's limit
            yield OpenAIError(400, str(err), param="prompt").to_item()
        except Exception as err:
            logger.error("model %s failed during request %s: %r", self.model_name, request_id, err)
            yield OpenAIError(503, f"model {self.model_name!r} failed while generating ({type(err).__name__}); "
                              "its replica is being replaced, retry", type_="server_error", code="replica_failed",
                              retry_after=1).to_item()

    # ---- helpers ----------------------------------------------------------------------------------------
    def _prompt(self, request: dict[str, Any]) -> list[int]:
        tok = self.tokenizer
        messages = request.get("messages")
        try:
            if messages is not None:
                text = render_chat(messages, tok.chat_template, tok.bos_token, tok.eos_token)
                ids = tok.encode(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token)))
                return self.engine.encode_prompt(ids)
            return self.engine.encode_prompt(request["prompt"])
        except ValueError as err:
            msg = str(err)
            code = "context_length_exceeded" if "context length" in msg else None
            raise OpenAIError(400, msg, param="messages" if messages is not None else "prompt", code=code) from err

    def _params(self, request: dict[str, Any], prompt: list[int]) -> SamplingParams:
        sampling = dict(request.get("sampling") or {})
        room = self.engine.max_model_len - len(prompt)
        if sampling.get("max_tokens") is None:
            sampling["max_tokens"] = room
        elif sampling["max_tokens"] > room:
            raise OpenAIError(400, f"this model's maximum context length is {self.engine.max_model_len} tokens, "
                              f"but {len(prompt)} prompt tokens plus max_tokens={sampling['max_tokens']} exceed it",
                              param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(**sampling, logprobs=request.get("logprobs"))
        except (TypeError, ValueError) as err:
            raise OpenAIError(400, str(err), param=_param_of(str(err))) from err

    def _logprobs(self, entries: tuple[dict[int, float], ...], token_ids: tuple[int, ...]) -> list[dict[str, Any]]:
        def piece(t: int) -> str:
            return self.tokenizer.decode([t], skip_special_tokens=False)

        return [{"token": piece(t), "logprob": e.get(t, float("-inf")),
                 "top": [(piece(a), lp) for a, lp in sorted(e.items(), key=lambda kv: -kv[1])]}
                for e, t in zip(entries, token_ids, strict=False)]
