"""lm-evaluation-harness against modelfleet, as evaluation teams run it: ``local-completions`` (several token-id
prompts per request, ``echo`` with ``logprobs``, ``max_tokens`` 1) on a small multiple-choice task scored by
log-likelihood (tests/data/lm_eval), compared item by item with lm-eval's own transformers model (``hf``) on
the same weights: the same log-likelihoods within 1e-3 and the same greedy flags, on both engines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.conftest import TARGET

DATA = Path(__file__).resolve().parents[1] / "data" / "lm_eval" / "code_mc.jsonl"
TASK = "modelfleet_code_mc"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The task's YAML, pointing at the JSONL in tests/data by its absolute path."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return folder


def run(task_dir: Path, model: str, model_args: dict) -> dict[int, list[tuple[float, bool]]]:
    """Per document: each choice's (log-likelihood, is_greedy), as lm-eval scored it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir)), batch_size=4)
    assert out is not None
    return {s["doc_id"]: [tuple(r[0]) for r in s["resps"]] for s in out["samples"][TASK]}


@pytest.fixture(scope="module")
def reference(task_dir) -> dict[int, list[tuple[float, bool]]]:
    # add_bos_token on both sides: lm-eval's hf model and its API models default to different BOS handling
    return run(task_dir, "hf", {"pretrained": TARGET, "dtype": "float32", "device": "cpu", "add_bos_token": True})


@pytest.mark.parametrize("engine", ["native", "vllm"])
def test_local_completions_loglikelihoods_equal_transformers(server, task_dir, reference, engine):
    got = run(task_dir, "local-completions", {
        "model": engine, "base_url": f"{server}/v1/completions", "tokenizer": TARGET,
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
        "add_bos_token": True})
    assert got.keys() == reference.keys() and len(got) == 8
    for doc, choices in reference.items():
        assert len(got[doc]) == len(choices) == 4
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got[doc], choices, strict=True):
            assert abs(ll - ref_ll) < 1e-3, (doc, ll, ref_ll)
            assert greedy == ref_greedy, (doc, ll, ref_ll)
