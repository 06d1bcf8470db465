"""Speculative decoding: the acceptance rule follows the target distribution; greedy output is unchanged."""

from __future__ import annotations

import pytest
import torch

from parallel import LLM, SamplingParams
from parallel.sampler import Sampler
from parallel.speculative import verify
from tests.conftest import make_random_model

CHI2_CRITICAL_DF4_P001 = 18.47  # chi-square critical value, 4 degrees of freedom, alpha = 0.001


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _emitted(p: torch.Tensor, q: torch.Tensor, n: int, rule) -> torch.Tensor:
    """First and (when the first draft was accepted) second emitted token of n steps with k=2 drafts from q.

    p does not depend on the context here, so the token at position 2, whenever position 1 was accepted,
    must follow p[1] as the one at position 1 follows p[0]."""
    gen = torch.Generator().manual_seed(1234)
    sampler = Sampler(torch.Generator().manual_seed(99))
    params = SamplingParams(temperature=1.0, max_tokens=8)
    out = torch.zeros(2, p.shape[1])
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        tokens, _ = rule(p, q, drafts, params, sampler, gen)
        out[0, tokens[0]] += 1
        if len(tokens) > 1:
            out[1, tokens[1]] += 1
    return out


def test_acceptance_rule_follows_the_target_distribution():
    p = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05], [0.05, 0.05, 0.20, 0.30, 0.40], [0.2] * 5])
    q = torch.tensor([[0.10, 0.20, 0.30, 0.30, 0.10], [0.30, 0.30, 0.20, 0.10, 0.10]])
    counts = _emitted(p, q, 20000, verify)
    assert _chi2(counts[0], p[0]) < CHI2_CRITICAL_DF4_P001
    assert _chi2(counts[1], p[1]) < CHI2_CRITICAL_DF4_P001


def test_the_same_check_rejects_a_wrong_rule():
    def accept_everything(p, q, drafts, params, sampler, gen):
        return [*drafts, 0], len(drafts)

    p = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05], [0.05, 0.05, 0.20, 0.30, 0.40], [0.2] * 5])
    q = torch.tensor([[0.10, 0.20, 0.30, 0.30, 0.10], [0.30, 0.30, 0.20, 0.10, 0.10]])
    counts = _emitted(p, q, 20000, accept_everything)
    assert _chi2(counts[0], p[0]) > CHI2_CRITICAL_DF4_P001


def test_greedy_verification_emits_the_target_argmax():
    p = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    params = SamplingParams(temperature=0)
    assert verify(p, None, [1, 0], params, Sampler(), None) == ([1, 0, 2], 2)
    assert verify(p, None, [1, 2], params, Sampler(), None) == ([1, 0], 1)
    assert verify(p, None, [2, 0], params, Sampler(), None) == ([1], 0)


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("draft") / "d", "llama-gqa-llama3rope", seed=7)


PROMPTS = [[1, 17, 300, 42, 9], [1, 5], [1, *range(20, 80)], [1, 400, 401, 402, 403, 404, 405]]
GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("draft, k, options", [
    ("random", 3, {}),
    ("self", 4, {}),
    ("self", 2, {"num_blocks": 20, "max_model_len": 128, "enable_prefix_caching": False}),  # forces preemption
    # torch.compile'd target steps and draft proposals (one graph for all k); "self": two model instances of
    # the same shapes, each with its own compiled graphs
    ("random", 3, {"compile": True, "compile_draft": True}),
    ("self", 4, {"compile_draft": True}),
])
def test_greedy_output_unchanged_by_speculation(llama_path, llama_llm, draft_path, draft, k, options):
    expected = [o.token_ids for o in llama_llm.generate(PROMPTS, GREEDY)]
    spec = LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8, max_num_batched_tokens=48,
               draft_path=str(draft_path if draft == "random" else llama_path), num_speculative_tokens=k, **options)
    assert [o.token_ids for o in spec.generate(PROMPTS, GREEDY)] == expected
    stats = spec.engine.stats()
    if draft == "self":
        assert stats.spec_acceptance_rate == 1.0 and stats.spec_mean_tokens_per_step > 2
    if "num_blocks" in options:
        assert stats.num_preemptions > 0
    if options.get("compile_draft"):  # the proposals came from the one-graph loop, not pass by pass
        assert spec.engine.executor.runner.proposer.forward.compiled._proposals is not None
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("compile_draft", [False, True])  # sampled drafts: compiled passes, not the greedy graph
def test_speculation_with_prefix_cache_and_seeds(llama_path, draft_path, compile_draft):
    spec = LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8,
               draft_path=str(draft_path), num_speculative_tokens=3, compile_draft=compile_draft)
    shared = [1, *range(100, 140)]
    prompts = [[*shared, 7], [*shared, 8, 9]]
    first = spec.generate(prompts[:1], GREEDY)[0].token_ids
    second = spec.generate(prompts, GREEDY)
    assert second[0].token_ids == first and second[1].num_cached_tokens >= 40
    seeded = SamplingParams(max_tokens=20, temperature=0.9, seed=5, ignore_eos=True)
    assert spec.generate(prompts[:1], seeded)[0].token_ids == spec.generate(prompts[:1], seeded)[0].token_ids


def test_draft_service_proposer_keeps_greedy_output(llama_path, llama_llm):
    """The separate-placement path minus the transport: the draft in its own service, own block tables."""
    from parallel.config import EngineConfig
    from parallel.draft_service import DraftService, ServiceProposer
    from parallel.engine import LLMEngine

    service = DraftService(str(llama_path), k=3, max_model_len=256, num_blocks=64, block_size=8)
    engine = LLMEngine(EngineConfig.from_options(str(llama_path), skip_tokenizer_init=True, dtype="float32",
                                                 block_size=16, num_speculative_tokens=3, external_draft=True),
                       ServiceProposer(service.propose))
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            done.setdefault(d.request_id, []).extend(d.token_ids)
    assert [done[f"r{i}"] for i in range(len(PROMPTS))] == [o.token_ids for o in llama_llm.generate(PROMPTS, GREEDY)]
    stats = engine.stats()
    assert stats.spec_acceptance_rate == 1.0  # the target is its own draft here
    assert stats.draft_calls > 0 and stats.draft_call_ms > 0  # the remote draft's numbers, in the engine's stats
    engine.step()  # lets the runner forget finished requests
    assert service.stats()["sequences"] == 0
