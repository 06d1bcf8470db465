"""Per-request sampling parameters, validated at construction (shaped like vLLM's SamplingParams).

Every field is bounded to what the engine can hold, so no value a client sends can fail inside a step: a
seed must fit torch's 64-bit generator, top_k a torch int64 tensor, max_tokens an int32 count. An invalid
value raises ``InvalidRequestError`` with ``param`` naming the field (the server's 400 names it too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from parallel.errors import InvalidRequestError
from parallel.structured_spec import StructuredSpec

INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # torch.Generator.manual_seed's signed 64-bit range
MAX_TEMPERATURE = 1e4  # beyond this every distribution is uniform to float32 precision anyway
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound
MAX_PENALTY = 2.0  # OpenAI's presence_penalty / frequency_penalty range is [-2, 2]
MAX_REPETITION_PENALTY = 100.0  # vLLM takes any > 0; beyond this a logit is scaled to nothing anyway
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound per token
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_N = 128  # parallel samples (n, best_of) per prompt: each is an engine sequence with its own KV
MAX_BAD_WORDS = 64
MAX_BAD_WORD_CHARS = 256


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param} {message}", param=param)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k <= 0 (or -1) disables top-k (a top_k above the vocabulary size keeps
    every token, i.e. is off as well); top_p 1.0 disables nucleus sampling. A seed makes the request
    reproducible whatever else is in the batch (it owns its generator).

    Example:
        >>> SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=7).greedy
        False
        >>> SamplingParams(seed=2**64)
        Traceback (most recent call last):
        parallel.errors.InvalidRequestError: seed must be an integer in [-9223372036854775808, 9223372036854775807], ...
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return beside the sampled token
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = field(default=1)  # samples per prompt: fanned out above the engine (one sequence per request)
    best_of: int | None = None  # draw this many, return the n with the highest mean token logprob
    prompt_logprobs: int | None = None  # logprobs of each prompt token (and this many alternatives): vLLM's
    bad_words: tuple[str, ...] = ()  # vLLM's: the last token of a word is banned where it would complete it
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # bad_words tokenised (engine.with_bad_words)
    # Logits processing (vLLM's SamplingParams names and semantics; parallel/sampler.py cites the formulas)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs; a dict is accepted
    min_p: float = 0.0
    # Structured output (parallel/structured.py): a JSON schema, regex, choice or grammar the output follows;
    # vLLM's structured_outputs as a dict ({"json": {...}}) is accepted
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured, dict):
            object.__setattr__(self, "structured", StructuredSpec.from_options(self.structured))
        # Accept lists / a single string for convenience, store tuples so the object stays hashable and frozen.
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        object.__setattr__(self, "bad_words", _as_tuple(self.bad_words, "bad_words"))
        try:
            words = tuple(tuple(w) for w in _as_tuple(self.bad_words_token_ids, "bad_words_token_ids"))
        except TypeError:
            raise _bad("bad_words", "token ids must be lists of integers") from None
        object.__setattr__(self, "bad_words_token_ids", words)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else _as_tuple(self.logit_bias,
                                                                                             "logit_bias")
        try:
            object.__setattr__(self, "logit_bias", tuple(sorted((t, b) for t, b in bias)))
        except (TypeError, ValueError):
            raise _bad("logit_bias", "must map token ids to numbers") from None
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            raise _bad("max_tokens", f"must be an integer in [1, {INT32_MAX}], got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:  # also refuses nan
            raise _bad("temperature", f"must be a finite number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not _is_real(self.top_p) or not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            raise _bad("top_k", f"must be -1 or 0 (disabled) or an integer up to {INT32_MAX}, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise _bad("seed", f"must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise _bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise _bad("min_tokens", f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise _bad("stop", f"must be non-empty strings, got {self.stop!r}")
        if any(not _is_int(t) or not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise _bad("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, f"must be a boolean, got {getattr(self, name)!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise _bad(name, f"must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")
        r = self.repetition_penalty
        if not _is_real(r) or not 0 < r <= MAX_REPETITION_PENALTY:
            raise _bad("repetition_penalty", f"must be a number in (0, {MAX_REPETITION_PENALTY:g}], got {r!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS or any(
                not _is_int(t) or not 0 <= t <= INT32_MAX or not _is_real(b) or not abs(b) <= MAX_LOGIT_BIAS
                for t, b in self.logit_bias):
            raise _bad("logit_bias", f"must map at most {MAX_LOGIT_BIAS_TOKENS} token ids to numbers in "
                       f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise _bad("logit_bias", "names a token id twice")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredSpec):
            raise _bad("structured", f"must be a StructuredSpec, got {type(self.structured).__name__}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise _bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_N):
            raise _bad("best_of", f"must be an integer in [n, {MAX_N}], got {self.best_of!r}")
        pl = self.prompt_logprobs
        if pl is not None and (not _is_int(pl) or not 0 <= pl <= MAX_LOGPROBS):
            raise _bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {pl!r}")
        if len(self.bad_words) > MAX_BAD_WORDS or any(
                not isinstance(w, str) or not 0 < len(w) <= MAX_BAD_WORD_CHARS for w in self.bad_words):
            raise _bad("bad_words", f"must be at most {MAX_BAD_WORDS} non-empty strings of at most "
                       f"{MAX_BAD_WORD_CHARS} characters")
        if any(not w or any(not _is_int(t) or not 0 <= t <= INT32_MAX for t in w) for w in self.bad_words_token_ids):
            raise _bad("bad_words", "token ids must be non-empty lists of non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the request's token history (presence, frequency or repetition penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processed(self) -> bool:
        """Whether its logits change before sampling (penalties, logit_bias or bad words)."""
        return self.penalized or bool(self.logit_bias) or bool(self.bad_words_token_ids)

    @property
    def needs_history(self) -> bool:
        """Whether the runner must keep its tokens so far (penalties, or a bad word of several tokens)."""
        return self.penalized or any(len(w) > 1 for w in self.bad_words_token_ids)

    @property
    def num_sequences(self) -> int:
        """Engine sequences per prompt: best_of when set (the best n are kept), else n."""
        return self.best_of or self.n

    @property
    def effective_top_k(self) -> int:
        """0 when top-k is disabled."""
        return max(self.top_k, 0)


def _as_tuple(value: Any, param: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if param == "stop" else _fail_tuple(param, value)
    try:
        return tuple(value)
    except TypeError:
        return _fail_tuple(param, value)


def _fail_tuple(param: str, value: Any) -> tuple:
    raise _bad(param, f"must be a list, got {type(value).__name__}")
