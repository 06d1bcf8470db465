"""One request's failure inside the engine fails that request alone: in a batch of 16, the failing request
gets RequestFailedError, the other 15 finish exactly as in a quiet run, and the engine serves on.

Faults are injected into one request's own objects (its detokenizer, its logprobs) or, where the engine runs
in a child process, through the test-only environment hook of ``parallel.faults``.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from parallel import SamplingParams
from parallel.async_engine import AsyncEngine
from parallel.config import EngineConfig
from parallel.engine import LLMEngine
from parallel.errors import RequestFailedError
from parallel.faults import FAULT_ENV, FaultPlan, InjectedFault
from parallel.sampler import Sampler
from tests.conftest import REPO

MODEL = str(REPO / "models" / "tiny-code-llama")  # a real tokenizer: detokenizing is part of the step
OPTIONS = dict(dtype="float32", block_size=16, max_num_seqs=16)
N = 16
VICTIM = "r7"


def _batch() -> tuple[list[str], list[SamplingParams]]:
    rng = random.Random(0)
    words = ["def", "class", "import os", "return", "for i in range(", "while True:", "self.", "print("]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 6))) for _ in range(N)]
    # a few seeded sampled rows: their draws must not change when another row's sampling fails
    params = [SamplingParams(max_tokens=rng.randrange(8, 20), temperature=0.9 if i % 5 == 1 else 0,
                             seed=i if i % 5 == 1 else None, ignore_eos=True,
                             logprobs=1 if i % 3 == 0 else None, stop=["\n\n"] if i % 4 == 0 else ())
              for i in range(N)]
    return prompts, params


def _run(engine: LLMEngine, prompts: list[str], params: list[SamplingParams], sabotage=None) -> dict:
    """Run the batch to completion; per request: (token ids, text, finish reason, error)."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    if sabotage is not None:
        sabotage(engine)
    out: dict[str, list] = {f"r{i}": [[], "", None, None] for i in range(N)}
    while engine.has_unfinished():
        for d in engine.step():
            acc = out[d.request_id]
            acc[0] += d.token_ids
            acc[1] += d.text
            if d.finished:
                acc[2], acc[3] = d.finish_reason, d.error
    return out


@pytest.fixture(scope="module")
def native() -> LLMEngine:
    return LLMEngine(EngineConfig.from_options(MODEL, **OPTIONS))


@pytest.fixture(scope="module")
def quiet(native) -> dict:
    return _run(native, *_batch())


def _raise(*_args, **_kwargs):
    raise InjectedFault("boom")


def _detokenizer_fails(engine: LLMEngine) -> None:
    engine._live[VICTIM].detok.push = _raise  # this one request's detokenizer


def _stop_matcher_fails(engine: LLMEngine) -> None:
    engine._live[VICTIM].detok._find_stop = _raise  # its stop-string matcher
    engine._live[VICTIM].detok.params = SamplingParams(stop=["zzz"])


def _logprobs_fail(engine: LLMEngine) -> None:
    class Exploding(dict):  # the runner's logprob entries for this request cannot be read
        def __getitem__(self, key):
            if key == VICTIM:
                raise InjectedFault("boom")
            return super().__getitem__(key)

    execute = engine.executor.execute

    def wrapped(out):
        result = execute(out)
        if result.logprobs is not None:
            object.__setattr__(result, "logprobs", Exploding(result.logprobs))
        return result

    engine.executor.execute = wrapped


SAMPLED_VICTIM = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)


def _sampling_fails(engine: LLMEngine) -> None:
    """The batched draw raises whenever the victim is in the batch, after the seeded generators have
    drawn (as a failure midway would): the runner must isolate the victim and rewind the others."""
    real = engine.executor.runner.sampler

    class Failing(Sampler):
        def __call__(self, logits, params, generators, histories=None):
            tokens = real(logits, params, generators, histories)
            if any(p is SAMPLED_VICTIM for p in params):
                raise InjectedFault("boom")
            return tokens

    engine.executor.runner.sampler = Failing(real.default_generator)


@pytest.mark.parametrize("sabotage, victim_params", [
    (_detokenizer_fails, None), (_stop_matcher_fails, None),
    (_logprobs_fail, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)),
    (_sampling_fails, SAMPLED_VICTIM),
])
def test_one_failing_request_in_a_batch_of_16(native, quiet, sabotage, victim_params):
    prompts, params = _batch()
    if victim_params is not None:
        params[7] = victim_params
    sampler = native.executor.runner.sampler
    try:
        got = _run(native, prompts, params, sabotage)
    finally:
        native.executor.__dict__.pop("execute", None)  # back to the class's method
        native.executor.runner.sampler = sampler
    assert isinstance(got[VICTIM][3], RequestFailedError) and got[VICTIM][2] == "abort"
    for rid in got:
        if rid != VICTIM:
            assert got[rid] == quiet[rid], rid
    assert native.block_manager.num_used_blocks == 0  # the victim's blocks were freed with it
    assert not native.has_unfinished() and native.stats().num_failed >= 1
    again = _run(native, prompts, params)  # and it serves the next batch as if nothing happened
    assert {rid: v for rid, v in again.items() if rid != VICTIM} == {rid: v for rid, v in quiet.items()
                                                                       if rid != VICTIM}


def test_a_failed_model_step_fails_its_requests_and_the_engine_goes_on(native, quiet):
    prompts, params = _batch()
    calls = {"n": 0}
    execute = native.executor.execute

    def once(out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device hiccup")
        return execute(out)

    native.executor.execute = once
    try:
        got = _run(native, prompts, params)
    finally:
        del native.executor.execute
    failed = {rid for rid, v in got.items() if v[3] is not None}
    assert failed and all(isinstance(got[rid][3], RequestFailedError) for rid in failed)
    assert native.healthy and native.block_manager.num_used_blocks == 0
    native.check_health()
    assert _run(native, prompts, params) == quiet


def test_steps_that_keep_failing_make_the_engine_unhealthy(native):
    from parallel.errors import EngineDeadError

    native.executor.execute = _raise
    try:
        for i in range(3):
            native.add_request(f"doomed-{i}", "def f():", SamplingParams(max_tokens=4))
            while native.has_unfinished():
                native.step()
        assert not native.healthy
        with pytest.raises(EngineDeadError):
            native.check_health()
    finally:
        del native.executor.execute
    native.add_request("healing", "def f():", SamplingParams(max_tokens=4))
    while native.has_unfinished():
        native.step()
    assert native.healthy


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_engine_fails_one_request_and_serves_the_rest(monkeypatch, quiet, mode):
    """The environment hook reaches the engine whether it runs in this process or in a spawned child;
    the victim fails mid-stream, after 3 tokens went out."""
    monkeypatch.setenv(FAULT_ENV, f"{VICTIM}@3")
    eng = AsyncEngine.from_options(MODEL, engine_process=mode == "process", **OPTIONS)
    assert eng.mode == mode
    prompts, params = _batch()

    async def one(i: int) -> list:
        acc: list = [[], "", None, None]
        try:
            async for d in eng.generate(f"r{i}", eng.encode_prompt(prompts[i]), params[i]):
                acc[0] += d.token_ids
                acc[1] += d.text
                acc[2] = d.finish_reason
        except RequestFailedError as err:
            acc[2], acc[3] = "abort", err
        return acc

    async def main() -> list:
        return await asyncio.gather(*(one(i) for i in range(N)))

    try:
        got = dict(zip([f"r{i}" for i in range(N)], asyncio.run(main()), strict=True))
        assert isinstance(got[VICTIM][3], RequestFailedError) and "injected fault" in str(got[VICTIM][3])
        assert len(got[VICTIM][0]) == 2  # the tokens before the fault came out, then the typed error
        for rid in got:
            if rid != VICTIM:
                assert got[rid] == quiet[rid], rid
        assert eng.is_ready() and eng.stats().num_failed == 1
        eng.check_health()
        after = asyncio.run(one(3))
        assert after == quiet["r3"]
    finally:
        eng.shutdown()


def test_fault_plan_parsing():
    assert FaultPlan.parse("a@b@4") == FaultPlan("a@b", 4)
    assert FaultPlan.parse("req") == FaultPlan("req", 1)
    assert not FaultPlan("x", 2).should_fail("x", 1) and not FaultPlan("x").should_fail("y", 5)
