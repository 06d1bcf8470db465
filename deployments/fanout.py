"""One request of several sequences (``n``, ``best_of``, several prompts) as one stream of ``Chunk``s.

The replica runs each sequence as its own engine request (``parallel/fanout.py``) and merges their chunks
here, in arrival order, each labelled with its choice ``index`` (prompt i, sample j -> ``i * n + j``, as
OpenAI and vLLM number them) and carrying the request's running totals: ``prompt_tokens`` counts each
prompt once, ``completion_tokens`` every sequence's tokens (OpenAI's usage for n > 1).

- A sequence that fails fails the request: the others are cancelled (their engine requests aborted, their
  KV freed) and the error is the stream's last item, as a single-sequence request ends.
- ``best_of``: every candidate runs to the end, then each prompt's ``n`` best (highest mean token logprob)
  are emitted, best first; logprobs the client did not ask for are dropped.
- A consumer that stops early (a client that left) cancels every sequence.

Example:
    >>> import asyncio
    >>> async def seq(text):
    ...     yield Chunk(text, (1,), "length", 3, 1)
    >>> async def run():
    ...     merged = merge([(0, 0, seq("a")), (0, 1, seq("b"))], SamplingParams(n=2))  # 2 samples of 1 prompt
    ...     return sorted((c.index, c.text, c.completion_tokens) for c in [x async for x in merged])
    >>> asyncio.run(run())
    [(0, 'a', 1), (1, 'b', 2)]
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from deployments.messages import Chunk, ErrorInfo
from parallel.fanout import best_of_order
from parallel.sampling_params import SamplingParams

Sequence_ = tuple[int, int, AsyncIterator[Chunk | ErrorInfo]]  # (prompt i, sample j, its chunks)


async def merge(sequences: Sequence[Sequence_], params: SamplingParams) -> AsyncIterator[Chunk | ErrorInfo]:
    """The sequences' chunks as one stream (see the module docstring)."""
    queue: asyncio.Queue[tuple[int, Chunk | ErrorInfo | None]] = asyncio.Queue()

    async def pump(k: int, chunks: AsyncIterator[Chunk | ErrorInfo]) -> None:
        try:
            async for item in chunks:
                await queue.put((k, item))
                if isinstance(item, ErrorInfo):
                    return
        finally:
            await queue.put((k, None))

    tasks = [asyncio.ensure_future(pump(k, chunks)) for k, (_, _, chunks) in enumerate(sequences)]
    prompt_tokens: dict[int, int] = {}
    completion = [0] * len(sequences)
    held: list[list[Chunk]] = [[] for _ in sequences]  # best_of: every candidate's chunks until all ended
    best_of = params.best_of is not None
    try:
        running = len(tasks)
        while running:
            k, item = await queue.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, ErrorInfo):
                yield item
                return
            i, j = sequences[k][0], sequences[k][1]
            prompt_tokens[i] = max(prompt_tokens.get(i, 0), item.prompt_tokens)
            completion[k] = item.completion_tokens
            totals = {"prompt_tokens": sum(prompt_tokens.values()), "completion_tokens": sum(completion)}
            if best_of:
                held[k].append(item)
            else:
                yield dataclasses.replace(item, index=i * params.n + j, **totals)
        if best_of:
            for chunk in _best(sequences, held, params, sum(prompt_tokens.values()), sum(completion)):
                yield chunk
    finally:
        for t in tasks:
            t.cancel()  # a sequence still running (an error elsewhere, a client that left): abort it


def _best(sequences: Sequence[Sequence_], held: list[list[Chunk]], params: SamplingParams, prompt_tokens: int,
          completion_tokens: int) -> list[Chunk]:
    """Each prompt's n best candidates, re-indexed best first, as whole chunks (best_of never streams)."""
    out = []
    for i in sorted({s[0] for s in sequences}):
        ks = [k for k, s in enumerate(sequences) if s[0] == i]
        lps = [[e.logprob for c in held[k] for e in (c.logprobs or ())] for k in ks]
        for rank, pick in enumerate(best_of_order(lps, params.n)):
            chunks = held[ks[pick]]
            entries = tuple(e for c in chunks for e in (c.logprobs or ()))
            first, last = chunks[0], chunks[-1]
            out.append(Chunk("".join(c.text for c in chunks), tuple(t for c in chunks for t in c.token_ids),
                             last.finish_reason, prompt_tokens, completion_tokens,
                             entries if params.logprobs is not None else None, first.queue_s, i * params.n + rank,
                             first.prompt_text, first.prompt_logprobs))
    return out
