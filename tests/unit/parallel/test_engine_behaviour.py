"""Engine behaviour on a random Llama: batch invariance, preemption, prefix caching, seeds, bad input."""

from __future__ import annotations

import random

import pytest

from parallel import LLM, SamplingParams
from parallel.config import EngineConfig
from parallel.engine import LLMEngine
from parallel.errors import ContextLengthError, InvalidRequestError

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _engine(path, **options) -> LLMEngine:
    return LLMEngine(EngineConfig.from_options(str(path), skip_tokenizer_init=True, dtype="float32", **options))


def _run_staggered(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
                   join_steps: list[int]) -> dict[str, list[int]]:
    """Add request i at step join_steps[i]; run to completion; return token ids by request id."""
    tokens: dict[str, list[int]] = {}
    done: set[str] = set()
    step = 0
    while len(done) < len(prompts):
        for i, s in enumerate(join_steps):
            if s == step:
                engine.add_request(f"r{i}", prompts[i], params[i])
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            if delta.finished:
                done.add(delta.request_id)
        step += 1
    return tokens


def test_batch_invariance_greedy(llama_path, llama_llm):
    target = _prompts(1, seed=99)[0]
    alone = llama_llm.generate([target], GREEDY)[0].token_ids
    others = _prompts(15, seed=1)
    rng = random.Random(2)
    params = [GREEDY] + [SamplingParams(max_tokens=rng.randrange(2, 30), temperature=0, ignore_eos=True)
                         for _ in others]
    engine = _engine(llama_path, max_num_batched_tokens=64, block_size=8)
    joins = [5] + [rng.randrange(0, 20) for _ in others]  # others join and leave around the target
    done = _run_staggered(engine, [target, *others], params, joins)
    assert done["r0"] == alone


def test_preemption_gives_same_outputs(llama_path, llama_llm):
    prompts = _prompts(8, seed=3, lo=20, hi=40)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in llama_llm.generate(prompts, params)]
    # 24 blocks of 8 tokens: room for ~3 of the 8 requests at full length, so some must be preempted.
    small = LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", num_blocks=24, block_size=8,
                max_model_len=96, enable_prefix_caching=False)
    got = [o.token_ids for o in small.generate(prompts, params)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert small.engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hits_and_identical_outputs(llama_path):
    shared = _prompts(1, seed=4, lo=50, hi=51)[0]
    prompts = [shared + tail for tail in ([7, 8, 9], [10, 11], [12, 13, 14, 15])]
    cached = LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8)
    plain = LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8, enable_prefix_caching=False)
    first = cached.generate(prompts[:1], GREEDY)
    rest = cached.generate(prompts[1:], GREEDY)
    assert all(o.num_cached_tokens >= 48 for o in rest)  # the 6 full shared blocks
    assert cached.engine.block_manager.prefix_hit_rate > 0
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert plain.engine.block_manager.prefix_hit_rate == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(llama_llm):
    prompt = _prompts(1, seed=5)[0]
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llama_llm.generate([prompt], seeded)[0].token_ids
    again = llama_llm.generate([prompt], seeded)[0].token_ids
    noisy = [SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)] * 5
    batch = llama_llm.generate([*_prompts(5, seed=6), prompt], [*noisy, seeded])[-1].token_ids
    other_seed = llama_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=1.0, seed=99,
                                                             ignore_eos=True))[0].token_ids
    assert alone == again == batch
    assert other_seed != alone


def test_max_tokens_stop_token_ids_and_eos(llama_llm):
    prompt = _prompts(1, seed=7)[0]
    free = llama_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    stopped = llama_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0,
                                                          stop_token_ids=[stop_at]))[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_at


def test_logprobs_are_returned(llama_llm):
    out = llama_llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, logprobs=3,
                                                         ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for token, entry in zip(out.token_ids, lps, strict=True):
        assert token in entry and len(entry) == 3  # greedy token is the top-1, so it is among the 3
        assert max(entry.values()) == entry[token] <= 0.0


@pytest.mark.parametrize("make, message", [
    (lambda: SamplingParams(max_tokens=0), "max_tokens"),
    (lambda: SamplingParams(temperature=-0.5), "temperature"),
    (lambda: SamplingParams(top_p=0.0), "top_p"),
    (lambda: SamplingParams(top_p=1.5), "top_p"),
])
def test_bad_sampling_params_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_prompts_raise_and_engine_keeps_serving(llama_path):
    engine = _engine(llama_path)
    engine.add_request("good-1", [1, 2, 3, 4], GREEDY)
    engine.step()
    with pytest.raises(InvalidRequestError, match="empty") as e:
        engine.add_request("bad-empty", [], GREEDY)
    assert e.value.param == "prompt"
    with pytest.raises(ContextLengthError, match="context length") as e:
        engine.add_request("bad-long", [5] * 300, GREEDY)
    assert (e.value.param, e.value.code) == ("prompt", "context_length_exceeded")
    with pytest.raises(InvalidRequestError, match=r"token ids must be integers in \[0, 512\)"):
        engine.add_request("bad-id", [1, 99999], GREEDY)
    with pytest.raises(InvalidRequestError, match="text prompts need a tokenizer"):
        engine.add_request("bad-text", "hello", GREEDY)
    with pytest.raises(InvalidRequestError, match="stop_token_ids") as e:
        engine.add_request("bad-stop", [1, 2], SamplingParams(stop_token_ids=[512]))
    assert e.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good-1", [1, 2], GREEDY)
    engine.add_request("good-2", [1, 9, 9], GREEDY)
    done = {}
    while engine.has_unfinished():
        done.update({d.request_id: d for d in engine.step() if d.finished})
    assert set(done) == {"good-1", "good-2"}
    assert all(d.num_output_tokens == 16 and d.error is None for d in done.values())
    assert engine.block_manager.num_used_blocks == 0


def test_offline_generate_rejects_a_bad_prompt_before_running_any(llama_llm):
    with pytest.raises(ValueError, match="empty"):
        llama_llm.generate([[1, 2], []], GREEDY)
    assert not llama_llm.engine.has_unfinished()
    assert len(llama_llm.generate([[1, 2]], GREEDY)[0].token_ids) == 16


def test_max_model_len_finishes_with_length(llama_path):
    llm = LLM(str(llama_path), skip_tokenizer_init=True, dtype="float32", max_model_len=32)
    out = llm.generate([[1] * 20], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_abort_frees_blocks_and_stats(llama_path):
    engine = _engine(llama_path, block_size=8)
    engine.add_request("a", list(range(1, 40)), GREEDY)
    engine.add_request("b", list(range(1, 20)), GREEDY)
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 2 and stats.kv_blocks_used > 0 and 0 < stats.kv_usage < 1
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    engine.abort("unknown")  # ignored
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().kv_blocks_used == 0
    assert engine.stats().tokens_per_s > 0
