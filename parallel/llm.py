"""The offline API, shaped like vLLM's: ``LLM(path, **options).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from parallel.config import EngineConfig
from parallel.engine import LLMEngine
from parallel.errors import InvalidRequestError
from parallel.fanout import best_of_order, child_params
from parallel.outputs import RequestOutput, RequestOutputBuilder
from parallel.sampling_params import SamplingParams
from parallel.tokenizer import Tokenizer

Prompt = str | list[int] | dict[str, Any]


def normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[str | list[int]]:
    """One prompt or many: a string, a list of token ids, or ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``."""
    if isinstance(prompts, str | dict) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out: list[str | list[int]] = []
    for p in prompts:
        if isinstance(p, dict):
            p = p.get("prompt_token_ids", p.get("prompt"))
        if not isinstance(p, str | list):
            raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}",
                                      param="prompt")
        out.append(p)
    return out


class LLM:
    """Offline batched generation.

    Example:
        >>> from parallel import LLM, SamplingParams
        >>> llm = LLM("models/tiny-code-llama")
        >>> out = llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=48, temperature=0))[0]
        >>> out.text, out.token_ids, out.finish_reason  # doctest: +SKIP
    """

    def __init__(self, model: str, **options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_options(model, **options))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; returns outputs in prompt order.

        All prompts are validated before any runs, so a bad one raises InvalidRequestError (a ValueError) and
        nothing is left queued. A request that fails inside the engine raises its RequestFailedError (the
        others are aborted).
        """
        plist = normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(plist)
        params = list(sampling_params)
        if len(params) != len(plist):
            raise ValueError(f"got {len(plist)} prompts but {len(params)} sampling params")
        encoded = [self.engine.encode_prompt(p) for p in plist]
        # n samples (best_of candidates) of a prompt are that many engine requests (parallel/fanout.py)
        children = [[f"offline-{next(self._ids)}" for _ in range(sp.num_sequences)] for sp in params]
        builders = {rid: RequestOutputBuilder(rid, p if isinstance(p, str) else None, tuple(e))
                    for kids, p, e in zip(children, plist, encoded, strict=True) for rid in kids}
        for kids, e, sp in zip(children, encoded, params, strict=True):
            for j, rid in enumerate(kids):
                self.engine.add_request(rid, e, child_params(sp, j))
        ids = [rid for kids in children for rid in kids]
        done: set[str] = set()
        try:
            while len(done) < len(ids):
                for delta in self.engine.step():
                    if delta.error is not None:
                        raise delta.error
                    builders[delta.request_id].add(delta)
                    if delta.finished:
                        done.add(delta.request_id)
        finally:
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
        return [_gather([builders[rid] for rid in kids], sp) for kids, sp in zip(children, params, strict=True)]


def _gather(builders: list[RequestOutputBuilder], params: SamplingParams) -> RequestOutput:
    """One prompt's RequestOutput from its samples (best_of: the best n, best first)."""
    order = list(range(len(builders)))
    if params.best_of is not None:
        order = best_of_order([[e[t] for e, t in zip(b.logprobs or (), b.token_ids, strict=False)]
                               for b in builders], params.n)
    keep = params.logprobs is not None
    return builders[order[0]].build(tuple(builders[k].completion(i, keep) for i, k in enumerate(order)))
