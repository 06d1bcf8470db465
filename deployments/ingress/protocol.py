"""The OpenAI request schemas (https://platform.openai.com/docs/api-reference), bounded and strict.

Every field is either implemented or refused with a 400 naming it; none is silently ignored:
- unknown fields are errors (``extra="forbid"``);
- OpenAI fields not implemented (``suffix``, the deprecated ``functions``, ``audio``, non-text content parts,
  ...) are accepted only at their neutral value (null, ``""``, ``[]``, ``"none"``), which changes nothing, and
  refused otherwise;
- what constrains the output (``response_format``, vLLM's ``structured_outputs`` and ``guided_*``) and
  ``tools`` / ``tool_choice`` are typed in ``deployments/ingress/structured.py``;
- ``null`` stands for the default wherever OpenAI's field is nullable.
Every number is bounded to what the engine can hold (seed in int64, top_k below 2**31, ...), so a value that
validates here cannot crash an engine. The replica checks what only it knows (context length, vocabulary).

Example:
    >>> CompletionRequest.model_validate({"model": "m", "prompt": "x", "seed": 2**64})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: ...
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.ingress.structured import StructuredFields, ToolCallParam, ToolFields
from deployments.messages import ChatTurn, invalid
from parallel.sampling_params import SamplingParams
from parallel.structured_spec import StructuredSpec

INT32 = 2**31 - 1
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=INT32)]
StopString = Annotated[str, Field(min_length=1, max_length=1024)]
MAX_STOP = 16  # OpenAI allows 4; vLLM any number: each costs a scan of the text's tail per token
MAX_PROMPT_IDS = 1 << 20
MAX_PROMPTS = 256  # prompts in one completions request (evaluation harnesses batch them)
MAX_SEQUENCES = 512  # prompts x (best_of or n): each is an engine sequence
MAX_N = 128
MAX_MESSAGES = 4096
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_IDS)]

# field -> neutral values accepted (anything else is refused: not implemented yet)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,), "metadata": (None, {}),
    "store": (None, False), "service_tier": (None, "auto", "default"),
}


def _refuse_non_neutral(values: dict[str, Any], fields: tuple[str, ...]) -> None:
    for name in fields:
        value = values.get(name)
        if value is not None and not any(value == n and type(value) is type(n) for n in _NEUTRAL[name]):
            raise invalid(f"{name} is not supported by this server (only {_NEUTRAL[name][-1]!r} or null)",
                          param=name, code="unsupported_parameter")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _SamplingFields(StructuredFields):
    """Fields shared by completions and chat; vLLM's extensions (top_k, min_tokens, ...) are implemented."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=INT32)
    n: int | None = Field(None, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # draw this many, return the n most likely (unary only)
    seed: Seed | None = None
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0, le=INT32)
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)  # for stickiness and audit, never for the output
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)  # vLLM's extra
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1024)
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's extra
    bad_words: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, max_length=64)  # vLLM's

    REFUSED: ClassVar[tuple[str, ...]] = ()

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Validated engine parameters (a bad combination is a 400 naming the field)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if self.min_tokens and self.min_tokens > max_tokens:
            raise invalid(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})",
                          param="min_tokens", code="invalid_value")
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos), logprobs=logprobs, min_tokens=self.min_tokens or 0,
            skip_special_tokens=True if self.skip_special_tokens is None else self.skip_special_tokens,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._bias(), min_p=self.min_p or 0.0, n=self.n or 1, best_of=self.best_of,
            prompt_logprobs=prompt_logprobs, bad_words=tuple(self.bad_words or ()),
            structured=self.structured_spec())

    def _bias(self) -> dict[int, float]:
        return {int(k): b for k, b in (self.logit_bias or {}).items()}

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        """OpenAI's logit_bias: token ids as JSON object keys (strings), one spelling each."""
        for key in v or {}:
            if not key.isascii() or not key.isdigit() or len(key) > 10 or key != str(int(key)) or int(key) > INT32:
                raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
        return v

    @model_validator(mode="after")
    def _refuse(self) -> _SamplingFields:
        _refuse_non_neutral(self.__dict__, self.REFUSED)
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", param="stream_options",
                          code="invalid_value")
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise invalid(f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of",
                          code="invalid_value")
        if self.best_of is not None and self.best_of > (self.n or 1) and self.stream:
            raise invalid("best_of cannot be streamed (the best are known only once all have finished)",
                          param="best_of", code="invalid_value")
        return self


class CompletionRequest(_SamplingFields):
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(None, ge=0, le=INT32)  # 0 only with echo: the prompt's logprobs alone
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    REFUSED: ClassVar[tuple[str, ...]] = (*_SamplingFields.REFUSED, "suffix")

    @model_validator(mode="after")
    def _sizes(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise invalid("max_tokens must be at least 1 (0 only with echo)", param="max_tokens",
                          code="invalid_value")
        sequences = len(self.prompts()) * (self.best_of or self.n or 1)
        if sequences > MAX_SEQUENCES:
            raise invalid(f"prompts x (best_of or n) is {sequences}, more than {MAX_SEQUENCES} sequences",
                          param="n", code="invalid_value")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request (a list of strings or of token-id lists is several)."""
        p = self.prompt
        if isinstance(p, list) and isinstance(p[0], str | list):
            return list(p)  # type: ignore[arg-type]
        return [p]  # type: ignore[list-item]

    def requested_max_tokens(self) -> int:
        if self.max_tokens == 0:
            return 1  # echo alone: one token is computed (the prompt's last logits), not returned (vLLM's way)
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=4096)] | None = None
    name: None = None  # OpenAI's participant name: not rendered by chat templates here, so refused
    tool_calls: list[ToolCallParam] | None = Field(None, max_length=128)  # an assistant's calls
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)  # a tool's result answers this call

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:  # (ValueError: the 400 names the message, messages.<i>)
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id is required in (and only in) a message of role tool")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(ToolFields, _SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    REFUSED: ClassVar[tuple[str, ...]] = (
        *_SamplingFields.REFUSED, "functions", "function_call", "audio", "modalities", "prediction",
        "reasoning_effort", "web_search_options", "metadata", "store", "service_tier")

    @model_validator(mode="after")
    def _top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def turns(self) -> tuple[ChatTurn, ...]:
        return tuple(ChatTurn(m.role, m.text(), tuple(c.turn() for c in m.tool_calls or ()), m.tool_call_id)
                     for m in self.messages)

    def structured_spec(self) -> StructuredSpec | None:
        """A required or named tool_choice constrains the output (and takes no other constraint)."""
        return self.tool_spec(super().structured_spec())


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
# Strict: in an input that may be texts or ids, "1" and true are mistakes, not token 1 (lax ints would take them).
EmbeddingIds = Annotated[list[Annotated[int, Field(strict=True, ge=0, le=INT32)]],
                         Field(min_length=1, max_length=MAX_PROMPT_IDS)]


class EmbeddingRequest(_Strict):
    """OpenAI's four input forms: a text, texts, one token-id list, token-id lists. The replica checks the ids
    against its vocabulary (only it knows it)."""

    model: str = Field(min_length=1, max_length=256)
    input: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] | EmbeddingIds
            | Annotated[list[EmbeddingIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)])
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: None = None  # MiniLM-style encoders have one size: refused (400 naming it) when set
    user: str | None = Field(None, max_length=256)

    def inputs(self) -> list[str] | list[list[int]]:
        """One entry per embedding, in order: texts, or token-id lists (a flat id list is one input)."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


ROUTE_SCHEMAS: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
