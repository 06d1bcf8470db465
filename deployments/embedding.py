"""EmbeddingServer: sentence embeddings with Serve's dynamic batching (``@serve.batch``).

Concurrent requests' texts are gathered into one encoder batch (up to ``max_batch_size`` texts or
``batch_wait_timeout_s``), which is what makes a small encoder cheap under load. A request's texts enter
the batch queue ``max_batch_size`` at a time, each slice after the previous one is done, so a request of
2,048 inputs and a one-string request behind it interleave: the small one waits for one batch, not for
all 64. At most ``MAX_INPUTS`` inputs per request (OpenAI's limit): texts, or token-id lists (OpenAI's other
``input`` form; ids checked against the encoder's vocabulary), each truncated to the encoder's length.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from ray import serve

from deployments import metrics
from deployments.messages import ErrorInfo
from deployments.telemetry import Observability, Telemetry, app_version
from parallel.embedding_model import EmbeddingModel

logger = logging.getLogger("ray.serve")
BATCH = 32
MAX_INPUTS = 2048


@serve.deployment
class EmbeddingServer:
    """Embeds texts or token ids. Python callers: ``await handle.embed.remote(["a", "b"])`` (or
    ``[[101, 7592, 102]]``) -> vectors and token counts.

    Example:
        >>> h = serve.get_deployment_handle("all-minilm-l6-v2", app_name="modelfleet")
        >>> (await h.embed.remote(["hello"]))["data"][0]["embedding"][:2]
        [-0.06..., 0.02...]
    """

    def __init__(self, model_name: str, source: str, observability: Observability | None = None,
                 version: str = "", sha256: str = "") -> None:
        self.model_name, self.version, self.sha256 = model_name, app_version(version), sha256
        version = self.version
        self.model = EmbeddingModel(source)
        self.telemetry = Telemetry.start(observability or Observability(), "embedding", model_name, version)
        logger.info("embedding model %s ready (%d dimensions)", model_name, self.model.dimensions)

    async def __del__(self) -> None:
        await self.telemetry.stop()

    async def info(self) -> dict[str, Any]:
        return {"name": self.model_name, "dimensions": self.model.dimensions, "version": self.version,
                "sha256": self.sha256}

    @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, inputs: list[str | list[int]]) -> list[tuple[list[float], int]]:
        # through the module: Serve pickles this batched method by value, and a metric holds a lock
        metrics.EMBEDDING_BATCH.labels(self.model_name).observe(len(inputs))
        vectors, counts = await asyncio.to_thread(self.model.embed, inputs)  # texts and ids share one batch
        return list(zip(vectors, counts, strict=True))

    def _refusal(self, inputs: Sequence[Any]) -> ErrorInfo | None:
        if not 0 < len(inputs) <= MAX_INPUTS:
            return ErrorInfo(400, f"input must hold 1 to {MAX_INPUTS} items", param="input")
        if all(isinstance(x, str) and x for x in inputs):
            return None
        if not all(isinstance(x, list | tuple) and x for x in inputs):
            return ErrorInfo(400, "input must be non-empty strings or non-empty token-id lists", param="input")
        vocab = self.model.vocab_size
        for i, row in enumerate(inputs):
            # every id, also those past the length the encoder reads: an id outside the vocabulary is a mistake
            if not all(type(t) is int for t in row) or min(row) < 0 or max(row) >= vocab:  # not bool: int's kin
                bad = [t for t in row if type(t) is not int or not 0 <= t < vocab][:5]
                return ErrorInfo(400, f"input[{i}]: token ids must be integers in [0, {vocab}) (this model's "
                                      f"vocabulary), got {bad}", param="input")
        return None

    async def embed(self, inputs: list[str] | list[list[int]]) -> dict[str, Any] | ErrorInfo:
        """``{"data": [{"embedding", "index"}], "prompt_tokens": n}`` for the given texts or token-id lists, in
        order; ``prompt_tokens`` counts what the encoder read (a text's ids with [CLS]/[SEP], or the ids)."""
        refusal = self._refusal(inputs)
        if refusal is not None:
            return refusal
        # WordPiece makes at most one token of max_input_chars_per_word (100) characters plus a separator, so
        # nothing past max_length * 101 characters can reach the encoder: cut it before tokenising. Id lists
        # are truncated to max_length as texts are (one rule for both forms; vLLM would refuse them instead).
        cut = self.model.max_length * 101
        items = [x[:cut] if isinstance(x, str) else list(x[:self.model.max_length]) for x in inputs]
        results: list[tuple[list[float], int]] = []
        for start in range(0, len(items), BATCH):  # one slice at a time: other requests interleave
            results += await asyncio.gather(*(self._embed_batch(x) for x in items[start:start + BATCH]))
        return {"data": [{"index": i, "embedding": v} for i, (v, _) in enumerate(results)],
                "prompt_tokens": sum(n for _, n in results)}
