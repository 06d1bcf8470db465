from __future__ import annotations

import asyncio

import pytest

from parallel import SamplingParams
from parallel.async_engine import AsyncEngine, EngineDeadError


@pytest.fixture(scope="module", params=["thread", "process"])
def engine(request, llama_path):
    """The step loop in a thread of this process, and in an engine process of its own: same behaviour."""
    eng = AsyncEngine.from_options(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8,
                                   engine_process=request.param == "process")
    assert (eng.core is not None) == (request.param == "process")
    yield eng
    eng.shutdown()


def test_concurrent_streams_match_offline(engine, llama_llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3], [1, 50, 60, 70, 80], [1, 9]]

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(f"c{i}", prompts[i], params):
            tokens.extend(out.outputs[0].delta_token_ids)
            last = out
        assert last.finished and list(last.outputs[0].token_ids) == tokens
        return tokens

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(i) for i in range(3)))

    got = asyncio.run(main())
    assert got == [o.token_ids for o in llama_llm.generate(prompts, params)]


def test_leaving_early_aborts_and_frees_blocks(engine):
    async def main() -> None:
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        agen = engine.generate("leaver", [1, *range(3, 60)], params)
        async for out in agen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await agen.aclose()  # what a disconnecting client's handler does
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
                return
        raise AssertionError(f"blocks not freed: {engine.stats()}")

    asyncio.run(main())


def test_bad_input_raises_in_the_caller_and_others_continue(engine):
    async def main() -> list[int]:
        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate("bad", [], SamplingParams()):
                pass
        tokens = []
        async for out in engine.generate("ok", [1, 4], SamplingParams(max_tokens=4, ignore_eos=True)):
            tokens = list(out.outputs[0].token_ids)
        return tokens

    assert len(asyncio.run(main())) == 4
    assert engine.is_alive()


@pytest.mark.parametrize("engine_process", [False, True])
def test_stream_interval_groups_tokens_and_keeps_the_text(llama_path, llama_llm, engine_process):
    """stream_interval=4: first token alone, then chunks of 4 new tokens, the last chunk whatever is left
    (merged further only when the consumer lags); the concatenation is the plain greedy output."""
    eng = AsyncEngine.from_options(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8,
                                   stream_interval=4, engine_process=engine_process)
    params = SamplingParams(max_tokens=11, temperature=0, ignore_eos=True)

    async def main() -> list[tuple[int, ...]]:
        return [out.outputs[0].delta_token_ids async for out in eng.generate("si", [1, 7, 8], params)]

    try:
        chunks = asyncio.run(main())
    finally:
        eng.shutdown()
    # held back to 4 at a time; a consumer that lags may get several chunks merged, never smaller ones
    sizes = [len(c) for c in chunks]
    merged = [[1, 4, 4, 2], [5, 4, 2], [1, 8, 2], [1, 4, 6], [9, 2], [5, 6], [1, 10], [11]]  # runs of [1, 4, 4, 2]
    assert sizes in merged, sizes
    assert [t for c in chunks for t in c] == llama_llm.generate([[1, 7, 8]], params)[0].token_ids


def test_engine_process_that_dies_fails_streams_and_health(llama_path):
    eng = AsyncEngine.from_options(str(llama_path), skip_tokenizer_init=True, dtype="float32", block_size=8,
                                   engine_process=True)
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main() -> None:
        n = 0
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate("victim", [1, 5, 6], params):
                n += 1
                if n == 2:
                    eng.core.process.kill()  # what the OOM killer would do
        with pytest.raises(EngineDeadError):
            eng.check_health()

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
