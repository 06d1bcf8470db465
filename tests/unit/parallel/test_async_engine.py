"""AsyncEngine in both modes (a thread of this process, a supervised engine process): deltas, aborts,
stream_interval, and the engine process's death and restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from parallel import SamplingParams
from parallel.async_engine import AsyncEngine
from parallel.engine_api import Engine
from parallel.errors import EngineDeadError, InvalidRequestError


@pytest.fixture(scope="module", params=["thread", "process"])
def engine(request, llama_path):
    """The step loop in a thread of this process, and in an engine process of its own: same behaviour."""
    eng = AsyncEngine.from_options(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8,
                                   engine_process=request.param == "process")
    assert eng.mode == request.param and isinstance(eng, Engine)
    assert bool(eng.process_ids()) == (request.param == "process")
    yield eng
    eng.shutdown()


async def _collect(engine: AsyncEngine, rid: str, ids: list[int], params: SamplingParams) -> list:
    return [d async for d in engine.generate(rid, ids, params)]


def test_deltas_concatenate_to_the_offline_output(engine, llama_llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [[1, 2, 3], [1, 50, 60, 70, 80], [1, 9]]

    async def main() -> list[list]:
        return await asyncio.gather(*(_collect(engine, f"c{i}", p, params) for i, p in enumerate(prompts)))

    offline = llama_llm.generate(prompts, params)
    for deltas, want, prompt in zip(asyncio.run(main()), offline, prompts, strict=True):
        assert [t for d in deltas for t in d.token_ids] == want.token_ids
        got_lps = [e for d in deltas for e in d.logprobs]  # other batch shapes: equal up to float rounding
        assert [list(e) for e in got_lps] == [list(e) for e in want.outputs[0].logprobs]
        assert all(v == pytest.approx(w, abs=1e-4) for e, f in zip(got_lps, want.outputs[0].logprobs, strict=True)
                   for v, w in zip(e.values(), f.values(), strict=True))
        counts = [d.num_output_tokens for d in deltas]  # running counts, consistent with the deltas' sizes
        assert counts == [sum(len(d.token_ids) for d in deltas[:i + 1]) for i in range(len(deltas))]
        assert deltas[-1].finished and deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 12
        assert not any(d.finished for d in deltas[:-1])
        assert all(d.num_prompt_tokens == len(prompt) for d in deltas)


def test_leaving_early_aborts_and_frees_blocks(engine):
    async def main() -> None:
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        agen = engine.generate("leaver", [1, *range(3, 60)], params)
        async for delta in agen:
            if delta.num_output_tokens >= 3:
                break
        await agen.aclose()  # what a disconnecting client's handler does
        for _ in range(500):
            await asyncio.sleep(0.02)
            if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
                return
        raise AssertionError(f"blocks not freed: {engine.stats()}")

    asyncio.run(main())


def test_bad_input_raises_in_the_caller_and_others_continue(engine):
    async def main() -> list:
        with pytest.raises(InvalidRequestError, match="empty"):
            await _collect(engine, "bad", [], SamplingParams())
        with pytest.raises(InvalidRequestError, match="stop_token_ids") as e:  # refused by the engine itself
            await _collect(engine, "bad-stop", [1, 2], SamplingParams(stop_token_ids=[100_000]))
        assert e.value.param == "stop_token_ids"
        return await _collect(engine, "ok", [1, 4], SamplingParams(max_tokens=4, ignore_eos=True))

    assert asyncio.run(main())[-1].num_output_tokens == 4
    assert engine.is_ready()
    engine.check_health()


@pytest.mark.parametrize("engine_process", [False, True])
def test_stream_interval_groups_tokens_and_keeps_the_text(llama_path, llama_llm, engine_process):
    """stream_interval=4: first token alone, then chunks of 4 new tokens, the last chunk whatever is left
    (merged further only when the consumer lags); the concatenation is the plain greedy output."""
    eng = AsyncEngine.from_options(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8,
                                   stream_interval=4, engine_process=engine_process)
    params = SamplingParams(max_tokens=11, temperature=0, ignore_eos=True)
    try:
        chunks = [d.token_ids for d in asyncio.run(_collect(eng, "si", [1, 7, 8], params))]
    finally:
        eng.shutdown()
    # held back to 4 at a time; a consumer that lags may get several chunks merged, never smaller ones
    sizes = [len(c) for c in chunks]
    merged = [[1, 4, 4, 2], [5, 4, 2], [1, 8, 2], [1, 4, 6], [9, 2], [5, 6], [1, 10], [11]]  # runs of [1, 4, 4, 2]
    assert sizes in merged, sizes
    assert [t for c in chunks for t in c] == llama_llm.generate([[1, 7, 8]], params)[0].token_ids


def _wait_until(predicate, bound_s: float = 300.0) -> bool:
    """Poll with a generous bound (a correctness bound, not a timing assertion)."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_killed_engine_process_fails_streams_then_restarts_in_place(llama_path, llama_llm):
    eng = AsyncEngine.from_options(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8,
                                   engine_process=True)
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    try:
        [pid] = eng.process_ids()

        async def victims() -> None:
            async def one(rid: str) -> None:
                n = 0
                async for _ in eng.generate(rid, [1, 5, 6], params):
                    n += 1
                    if n == 2 and rid == "victim-0":
                        os.kill(pid, signal.SIGKILL)  # what the OOM killer would do
            for outcome in await asyncio.gather(*(one(f"victim-{i}") for i in range(3)), return_exceptions=True):
                assert isinstance(outcome, EngineDeadError), outcome

        asyncio.run(victims())
        if not eng.is_ready():  # restarting (it may already be back on a fast machine)
            with pytest.raises(EngineDeadError, match="restarting"):
                asyncio.run(_collect(eng, "too-early", [1, 2], short))
        eng.check_health()  # one death is healed in place, not a reason to replace the replica
        assert _wait_until(eng.is_ready), "the engine process did not come back"
        assert eng.process_ids() and eng.process_ids() != [pid]
        after = asyncio.run(_collect(eng, "after", [1, 2, 3], short))
        assert [t for d in after for t in d.token_ids] == llama_llm.generate([[1, 2, 3]], short)[0].token_ids
    finally:
        eng.shutdown()


def test_restarts_are_bounded_then_health_fails(llama_path):
    from parallel.config import EngineConfig
    from parallel.engine_supervisor import RestartBudget

    config = EngineConfig.from_options(str(llama_path), skip_tokenizer_init=True, dtype="float32")
    eng = AsyncEngine(config, engine_process=True, restart_budget=RestartBudget(max_restarts=1, window_s=3600))
    try:
        for _ in range(2):
            [pid] = eng.process_ids() or [None]
            if pid is None:
                break
            os.kill(pid, signal.SIGKILL)
            assert _wait_until(lambda p=pid: eng.process_ids() != [p])
            _wait_until(lambda: eng.is_ready() or _fails(eng.check_health))
        assert _wait_until(lambda: _fails(eng.check_health)), "budget spent but health still passes"
        assert not eng.is_ready()
        with pytest.raises(EngineDeadError, match="giving up"):
            asyncio.run(_collect(eng, "late", [1, 2], SamplingParams(max_tokens=2)))
    finally:
        eng.shutdown()


def _fails(check) -> bool:
    try:
        check()
    except EngineDeadError:
        return True
    return False


def test_restart_budget_counts_within_its_window():
    from parallel.engine_supervisor import RestartBudget

    budget = RestartBudget(max_restarts=3, window_s=60)
    assert [budget.allow(t) for t in (0, 10, 20, 30, 59.9, 60.5, 71)] == [True, True, True, False, False, True, True]


@pytest.mark.parametrize("engine_process", [False, True])
def test_text_deltas_concatenate_to_the_offline_text(engine_process):
    """With a real tokenizer: stop strings, held-back text and all, the deltas' text is the offline text."""
    from parallel import LLM
    from tests.conftest import REPO

    model = str(REPO / "models" / "tiny-code-llama")
    prompts = ["def fibonacci(n):", "import os\n", "class Point:"]
    params = [SamplingParams(max_tokens=40, temperature=0, stop=["\n\n"]),
              SamplingParams(max_tokens=30, temperature=0, stop=["return"], include_stop_str_in_output=True),
              SamplingParams(max_tokens=25, temperature=0.7, seed=11)]
    offline = LLM(model, dtype="float32").generate(prompts, params)
    eng = AsyncEngine.from_options(model, dtype="float32", engine_process=engine_process)

    async def main() -> list[list]:
        return await asyncio.gather(*(_collect(eng, f"t{i}", eng.encode_prompt(p), sp)
                                      for i, (p, sp) in enumerate(zip(prompts, params, strict=True))))

    try:
        for deltas, want in zip(asyncio.run(main()), offline, strict=True):
            assert "".join(d.text for d in deltas) == want.text
            assert [t for d in deltas for t in d.token_ids] == want.token_ids
            assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (want.finish_reason,
                                                                          want.outputs[0].stop_reason)
    finally:
        eng.shutdown()


def test_vllm_options_are_the_engine_options():
    """One vocabulary: every option the vLLM adapter accepts is a native engine option of the same name."""
    from parallel.config import EngineConfig
    from parallel.vllm_engine import _ENGINE_ARG_NAMES, to_vllm_params  # noqa: F401  (imports without vLLM)

    assert set(_ENGINE_ARG_NAMES) <= EngineConfig.option_names() | {"engine_process"}
