"""Logits processing before sampling: bad words, logit_bias, then the repetition, frequency and presence
penalties.

The order and formulas are vLLM v1's (``vllm/v1/sample/sampler.py``: logits processors, then
``apply_penalties``), so that greedy outputs match vLLM's on the same model and settings. For a row with
prompt tokens P and output tokens so far O, ``c[v]`` the count of token v in O:

- bad words (vLLM's): ``l[w_k] = -inf`` for each word w_1..w_k whose w_1..w_{k-1} end O;
- ``logit_bias`` (OpenAI): ``l[v] += bias[v]``;
- repetition penalty (CTRL, Keskar et al. 2019, as vLLM applies it): for every v in P or O,
  ``l[v] = l[v] / r`` if ``l[v] > 0`` else ``l[v] * r``;
- frequency and presence penalties (OpenAI's documented formula):
  ``l[v] -= c[v] * frequency_penalty + (c[v] > 0) * presence_penalty``.

One batched pass over the rows that ask for it, sparse: only the tokens a row has seen change, so its cost
grows with the histories, never with batch x vocabulary; no Python loop over the vocabulary.

Example:
    >>> import torch
    >>> from parallel.sampling_params import SamplingParams
    >>> p = SamplingParams(temperature=0, presence_penalty=1.0, logit_bias={0: 0.5})
    >>> process(torch.tensor([[1.0, 2.0, 3.0]]), [p], [History([2], num_prompt_tokens=0)]).tolist()
    [[1.5, 2.0, 2.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from parallel.sampling_params import SamplingParams


@dataclass
class History:
    """A request's tokens so far (prompt, then outputs) as the model runner computed them."""

    tokens: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0

    def update(self, start_pos: int, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        """The tokens of one scheduled chunk at ``start_pos`` (a preempted request starts again at 0)."""
        del self.tokens[start_pos:]
        self.tokens.extend(token_ids)
        self.num_prompt_tokens = num_prompt_tokens


def process(logits: torch.Tensor, params: Sequence[SamplingParams],
            histories: Sequence[History | None]) -> torch.Tensor:
    """``logits`` [B, V] (float) with each row's logit_bias and penalties applied (a new tensor when any)."""
    rows = [i for i, p in enumerate(params) if p.processed]
    if not rows:
        return logits
    logits = logits.clone()
    device, vocab = logits.device, logits.shape[-1]
    banned = [(i, t) for i in rows for t in banned_tokens(params[i].bad_words_token_ids, histories[i])]
    if banned:
        r, t = zip(*banned, strict=True)
        logits[torch.tensor(r, device=device), torch.tensor(t, device=device)] = float("-inf")
    bias = [(i, t, b) for i in rows for t, b in params[i].logit_bias]
    if bias:
        r, t, b = zip(*bias, strict=True)
        logits.index_put_((torch.tensor(r, device=device), torch.tensor(t, device=device)),
                          torch.tensor(b, device=device, dtype=logits.dtype), accumulate=True)
    pen = [i for i in rows if params[i].penalized and histories[i] is not None]
    if not pen:
        return logits
    # Sparse: only tokens a row has seen change, so the work is O(history), never O(batch x vocabulary).
    # Flat indices i * V + token into the (contiguous) [B, V] logits.
    out_flat, prompt_flat = [], []
    for i in pen:
        h = histories[i]
        assert h is not None
        base = i * vocab
        prompt_flat += [base + t for t in h.tokens[:h.num_prompt_tokens]]
        out_flat += [base + t for t in h.tokens[h.num_prompt_tokens:]]
    flat = logits.view(-1)
    out_t = torch.tensor(out_flat, device=device, dtype=torch.long)
    seen = torch.unique(torch.cat([out_t, torch.tensor(prompt_flat, device=device, dtype=torch.long)]))
    rep, freq, pres = torch.tensor([(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params],
                                   device=device, dtype=logits.dtype).unbind(-1)  # rows without: 1, 0, 0 (unused)
    if seen.numel():
        r = rep[seen // vocab]
        v = flat[seen]
        flat[seen] = torch.where(v > 0, v / r, v * r)
    if out_t.numel():
        tokens, counts = torch.unique(out_t, return_counts=True)
        row = tokens // vocab
        flat[tokens] -= counts.to(logits.dtype) * freq[row] + pres[row]
    return logits


def banned_tokens(words: tuple[tuple[int, ...], ...], history: History | None) -> list[int]:
    """vLLM's bad words (``vllm/v1/sample/ops/bad_words.py``): a word's last token is banned where the output
    so far ends with the rest of the word (a one-token word: always)."""
    out = history.tokens[history.num_prompt_tokens:] if history is not None else []
    return [w[-1] for w in words if len(w) == 1 or (len(w) - 1 <= len(out) and tuple(out[len(out) - len(w) + 1:])
                                                     == w[:-1])]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's most likely one (vLLM's min_p, on the
    temperature-scaled logits): ``p[v] < min_p * max(p)`` <=> ``l[v] < max(l) + ln(min_p)``."""
    threshold = logits.max(dim=-1, keepdim=True).values + torch.log(min_p.clamp_min(1e-38))[:, None]
    return logits.masked_fill((min_p[:, None] > 0) & (logits < threshold), float("-inf"))
