"""EmbeddingServer: sentence embeddings with Serve's dynamic batching (``@serve.batch``).

Concurrent requests' texts are gathered into one encoder batch (up to ``max_batch_size`` texts or
``batch_wait_timeout_s``), which is what makes a small encoder cheap under load. A request's texts enter
the batch queue ``max_batch_size`` at a time, each slice after the previous one is done, so a request of
2,048 inputs and a one-string request behind it interleave: the small one waits for one batch, not for
all 64. At most ``MAX_INPUTS`` texts per request (OpenAI's limit), each truncated to the encoder's length.
"""

from __future__ import annotations

import asyncio
import logging
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
    """Embeds text. Python callers: ``await handle.embed.remote(["a", "b"])`` -> vectors and token counts.

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
    async def _embed_batch(self, texts: list[str]) -> list[tuple[list[float], int]]:
        # through the module: Serve pickles this batched method by value, and a metric holds a lock
        metrics.EMBEDDING_BATCH.labels(self.model_name).observe(len(texts))
        vectors, counts = await asyncio.to_thread(self.model.embed, texts)
        return list(zip(vectors, counts, strict=True))

    async def embed(self, texts: list[str]) -> dict[str, Any] | ErrorInfo:
        """``{"data": [{"embedding", "index"}], "prompt_tokens": n}`` for the given texts, in order."""
        if not 0 < len(texts) <= MAX_INPUTS or not all(isinstance(t, str) and t for t in texts):
            return ErrorInfo(400, f"input must be 1 to {MAX_INPUTS} non-empty strings", param="input")
        # WordPiece makes at most one token of max_input_chars_per_word (100) characters plus a separator, so
        # nothing past max_length * 101 characters can reach the encoder: cut it before tokenising.
        cut = self.model.max_length * 101
        texts = [t[:cut] for t in texts]
        results: list[tuple[list[float], int]] = []
        for start in range(0, len(texts), BATCH):  # one slice at a time: other requests interleave
            results += await asyncio.gather(*(self._embed_batch(t) for t in texts[start:start + BATCH]))
        return {"data": [{"index": i, "embedding": v} for i, (v, _) in enumerate(results)],
                "prompt_tokens": sum(n for _, n in results)}
