"""The offline API, shaped like vLLM's: ``LLM(path, **options).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from parallel.config import EngineConfig
from parallel.engine import LLMEngine
from parallel.outputs import RequestOutput
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
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
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

        All prompts are validated before any runs, so a bad one raises ValueError and nothing is left queued.
        """
        plist = normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(plist)
        params = list(sampling_params)
        if len(params) != len(plist):
            raise ValueError(f"got {len(plist)} prompts but {len(params)} sampling params")
        for p in plist:
            self.engine.encode_prompt(p)
        ids = [f"offline-{next(self._ids)}" for _ in plist]
        for rid, p, sp in zip(ids, plist, params, strict=True):
            self.engine.add_request(rid, p, sp)
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
        return [done[rid] for rid in ids]
