"""EmbeddingServer: sentence embeddings with Serve's dynamic batching (``@serve.batch``).

Concurrent requests' texts are gathered into one encoder batch (up to ``max_batch_size`` texts or
``batch_wait_timeout_s``), which is what makes a small encoder cheap under load.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from parallel.embedding_model import EmbeddingModel

logger = logging.getLogger("ray.serve")


@serve.deployment
class EmbeddingServer:
    """Embeds text. Python callers: ``await handle.embed.remote(["a", "b"])`` -> vectors and token counts.

    Example:
        >>> h = serve.get_deployment_handle("all-minilm-l6-v2", app_name="modelfleet")
        >>> (await h.embed.remote(["hello"]))["data"][0]["embedding"][:2]
        [-0.06..., 0.02...]
    """

    def __init__(self, model_name: str, source: str) -> None:
        self.model_name = model_name
        self.model = EmbeddingModel(source)
        logger.info("embedding model %s ready (%d dimensions)", model_name, self.model.dimensions)

    async def info(self) -> dict[str, Any]:
        return {"name": self.model_name, "dimensions": self.model.dimensions}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, texts: list[str]) -> list[tuple[list[float], int]]:
        vectors, counts = await asyncio.to_thread(self.model.embed, texts)
        return list(zip(vectors, counts, strict=True))

    async def embed(self, texts: list[str]) -> dict[str, Any]:
        """``{"data": [{"embedding", "index"}], "prompt_tokens": n}`` for the given texts, in order."""
        results = await asyncio.gather(*(self._embed_batch(t) for t in texts))
        return {"data": [{"index": i, "embedding": v} for i, (v, _) in enumerate(results)],
                "prompt_tokens": sum(n for _, n in results)}
