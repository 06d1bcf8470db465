"""Structured output on the native engine: xgrammar grammars, one matcher per request, a token bitmask per step.

The design is vLLM v1's (``vllm/v1/structured_output``: a StructuredOutputManager beside the scheduler) over
XGrammar (Dong et al. 2024, "XGrammar: Flexible and Efficient Structured Generation Engine for Large Language
Models", arXiv:2411.15100), which vLLM uses too:

- Admission (``GrammarBackend.admit``): the spec is parsed into an xgrammar ``Grammar`` at once (cheap and
  tokenizer-free; a bad schema, regex or grammar is an ``InvalidRequestError`` naming its field), then compiled
  against the vocabulary in a background thread: once per distinct spec (an LRU of futures keyed by the
  frozen spec), with the GIL released, so the step loop never waits for it. A request whose grammar is still
  compiling waits outside the scheduler (vLLM's WAITING_FOR_FSM) and joins it when the grammar is ready.
- Each step (``with_mask``): the matchers of the scheduled requests that sample fill one bitmask (xgrammar's
  batched fill); it travels with the ``SchedulerOutput`` to the runner (or to every tensor-parallel rank),
  which sets the disallowed logits to -inf before sampling (``apply_mask``: ``apply_token_bitmask_inplace``).
- After the step (``advance``): each matcher accepts the tokens the scheduler appended. The matchers live
  beside the scheduler and see only appended output tokens, so a preempted request (recomputed from its
  prompt and outputs) or a prompt prefilled in chunks never feeds them twice.
- Once the grammar is complete only the stop tokens are allowed; the matcher that accepts one is terminated
  and its request ends with finish reason "stop" (even under ignore_eos or min_tokens).

JSON is compact (no whitespace between tokens: vLLM's ``disable_any_whitespace``), so that a small or
random model cannot wander off into unbounded whitespace.

Example:
    >>> from parallel.structured_spec import StructuredSpec
    >>> backend = GrammarBackend("models/tiny-code-llama", vocab_size=4096, stop_token_ids=(2,))
    >>> spec = StructuredSpec.from_options({"choice": ["yes", "no"]})
    >>> backend.compile(spec).result().__class__.__name__
    'CompiledGrammar'
    >>> backend.admit(StructuredSpec("regex", "(a"), "r1")
    Traceback (most recent call last):
    parallel.errors.InvalidRequestError: structured_outputs.regex is invalid: Regex parsing error at position 3: ...
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from parallel.errors import InvalidRequestError, RequestFailedError
from parallel.step_messages import GrammarMask, SchedulerOutput
from parallel.structured_spec import StructuredSpec

if TYPE_CHECKING:
    import xgrammar as xgr

logger = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 30.0  # a grammar not compiled by then fails its request (400): it is too complex
CACHE_SIZE = 64  # compiled grammars kept (each holds per-state token masks: up to megabytes for big ones)
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[16:00:01] /project/cpp/x.cc:83: " in xgrammar's errors


def _xgr() -> Any:
    import xgrammar  # imported on first use: ~1 s and ~50 MB an engine that never constrains does not pay

    return xgrammar


def _reason(err: BaseException) -> str:
    lines = [_LOG_PREFIX.sub("", ln).strip() for ln in str(err).splitlines()]
    return " ".join(ln for ln in lines if ln)[:300] or type(err).__name__


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar of exactly these strings (vLLM's ``choice_as_grammar``, same escaping)."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return "root ::= " + " | ".join('"' + "".join(escape(c) for c in s) + '"' for s in choices)


def _is_lark(grammar: str) -> bool:
    """vLLM's ``grammar_is_likely_lark``: EBNF when any rule line has ``::=``, Lark otherwise."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.splitlines())


def unsupported_json_feature(schema: Any) -> str | None:
    """A keyword xgrammar would silently ignore (so outputs would not validate), as vLLM refuses them."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        types = node.get("type")
        types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
        if types & {"integer", "number"} and "multipleOf" in node:
            return "multipleOf"
        if "array" in types and (found := {"uniqueItems", "contains", "minContains", "maxContains"} & set(node)):
            return min(found)
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            return "allOf with several schemas"
        stack.extend(node.values())
    return None


@functools.lru_cache(maxsize=256)
def parse(spec: StructuredSpec) -> Any:
    """The spec as an xgrammar ``Grammar`` (independent of any tokenizer), cached per spec. Raises
    ``InvalidRequestError`` naming ``spec.param`` when it is not a valid schema, regex or grammar."""
    import json

    xgr = _xgr()
    name = spec.param if spec.param != "structured_outputs" else f"{spec.param}.{spec.kind}"
    if spec.kind == "json":
        feature = unsupported_json_feature(json.loads(spec.value))
        if feature is not None:
            raise InvalidRequestError(f"{name}: the JSON schema keyword {feature} is not supported",
                                      param=spec.param, code="invalid_value")
    try:
        if spec.kind in ("json", "json_object"):
            return xgr.Grammar.from_json_schema(spec.value if spec.kind == "json" else '{"type":"object"}',
                                                any_whitespace=False, separators=(",", ":"), strict_mode=True)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            return xgr.Grammar.from_ebnf(choice_grammar(spec.choices))
        return xgr.Grammar.from_lark(spec.value) if _is_lark(spec.value) else xgr.Grammar.from_ebnf(spec.value)
    except Exception as err:  # xgrammar raises RuntimeError (or its own types) with the parser's message
        raise InvalidRequestError(f"{name} is invalid: {_reason(err)}", param=spec.param,
                                  code="invalid_value") from None


def apply_mask(logits: torch.Tensor, request_ids: Sequence[str], mask: GrammarMask | None) -> torch.Tensor:
    """``logits`` [B, V] (row i: ``request_ids[i]``) with each masked row's disallowed tokens at -inf. Rows
    are matched by request id, so the caller's row order does not matter; float32 is kept or made."""
    if mask is None:
        return logits
    if tuple(request_ids) == mask.request_ids:  # every row constrained, in order: no rearranging
        logits = logits if logits.dtype == torch.float32 else logits.float()
        _xgr().apply_token_bitmask_inplace(logits, mask.bitmask.to(logits.device))
        return logits
    index = {rid: i for i, rid in enumerate(request_ids)}
    pairs = [(index[rid], j) for j, rid in enumerate(mask.request_ids) if rid in index]
    if not pairs:
        return logits
    rows, src = [p[0] for p in pairs], [p[1] for p in pairs]
    if logits.dtype != torch.float32:
        logits = logits.float()
    bitmask = torch.full((logits.shape[0], mask.bitmask.shape[1]), -1, dtype=torch.int32)
    bitmask[rows] = mask.bitmask[src]
    _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
    return logits


class GrammarBackend:
    """Compiled grammars (cached), the requests waiting for theirs, and one matcher per running request.

    Used from the engine's thread only, but for the compile thread it owns. ``tokenizer_folder`` holds the
    model's tokenizer.json; ``vocab_size`` is the model's (the logits' width, which may exceed the
    tokenizer's: the extra ids are never allowed).

    Example:
        >>> b = GrammarBackend("models/tiny-code-llama", vocab_size=4096, stop_token_ids=(2,))
        >>> spec = StructuredSpec("json_object")
        >>> _ = b.compile(spec).result()  # admission starts this; the step loop never waits for it
        >>> b.admit(spec, "r1")  # compiled: ready to schedule (False: it waits, take_ready hands it over)
        True
    """

    def __init__(self, tokenizer_folder: str | Path, vocab_size: int, stop_token_ids: Sequence[int],
                 max_threads: int = 2) -> None:
        self.folder, self.vocab_size = Path(tokenizer_folder), vocab_size
        self.stop_token_ids, self.max_threads = tuple(stop_token_ids), max_threads
        self._pool: ThreadPoolExecutor | None = None
        self._compiler: Any = None  # built in the compile thread on first use
        self._cache: OrderedDict[StructuredSpec, Future] = OrderedDict()
        self._waiting: dict[str, tuple[Future, float, str]] = {}  # request id -> grammar, since, its field
        self._matchers: dict[str, Any] = {}
        self._batch: Any = None  # xgrammar's BatchGrammarMatcher: fills many rows in one call
        self._lock = threading.Lock()  # the cache is read here and pruned here only, but be safe with callers
        self._build_lock = threading.Lock()

    # ---- compiling ----------------------------------------------------------------------------------------
    def _tokenizer_info(self) -> xgr.TokenizerInfo:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(self.folder / "tokenizer.json")))
        return _xgr().TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size,
                                                     stop_token_ids=list(self.stop_token_ids) or None)

    def _compile(self, grammar: Any) -> Any:
        with self._build_lock:  # the first compilation builds the compiler; a concurrent one waits for it
            if self._compiler is None:
                # cache_enabled=False: the LRU of futures here is the one cache, keyed by the spec
                self._compiler = _xgr().GrammarCompiler(self._tokenizer_info(), max_threads=self.max_threads,
                                                        cache_enabled=False)
        return self._compiler.compile_grammar(grammar)

    def compile(self, spec: StructuredSpec) -> Future:
        """The compiled grammar of ``spec``, as a future (done at once when cached). Parses first, so a bad
        spec raises ``InvalidRequestError`` here."""
        grammar = parse(spec)
        with self._lock:
            future = self._cache.get(spec)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(spec)
                return future
            if self._pool is None:
                # two: one slow grammar (compiling cannot be interrupted) does not hold up every other
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="grammar-compile")
            future = self._cache[spec] = self._pool.submit(self._compile, grammar)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return future

    # ---- requests -----------------------------------------------------------------------------------------
    def admit(self, spec: StructuredSpec, request_id: str) -> bool:
        """Start the request's grammar: True when it is ready now (it may be scheduled), False when it waits
        for its compilation (``take_ready`` hands it over later). Raises ``InvalidRequestError``."""
        future = self.compile(spec)
        if future.done():
            self._start(request_id, future, spec.param)
            return True
        self._waiting[request_id] = (future, time.monotonic(), spec.param)
        return False

    def _start(self, request_id: str, future: Future, param: str) -> None:
        err = future.exception()
        if err is not None:
            raise InvalidRequestError(f"{param} could not be compiled: {_reason(err)}", param=param,
                                      code="invalid_value")
        self._matchers[request_id] = _xgr().GrammarMatcher(future.result())

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def take_ready(self) -> tuple[list[str], dict[str, InvalidRequestError]]:
        """Requests whose grammar is now compiled (ready to schedule) and those that failed or timed out."""
        ready, failed = [], {}
        now = time.monotonic()
        for rid, (future, since, param) in list(self._waiting.items()):
            if future.done():
                del self._waiting[rid]
                try:
                    self._start(rid, future, param)
                    ready.append(rid)
                except InvalidRequestError as err:
                    failed[rid] = err
            elif now - since > COMPILE_TIMEOUT_S:
                del self._waiting[rid]
                failed[rid] = InvalidRequestError(f"{param} took more than {COMPILE_TIMEOUT_S:.0f} s to compile: "
                                                  "simplify it", param=param, code="invalid_value")
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Block until a waiting request's grammar is done or ``timeout`` passes (an idle engine, not a spin)."""
        futures = [f for f, _, _ in self._waiting.values()]
        if futures:
            wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)
        self._matchers.pop(request_id, None)

    # ---- each step ----------------------------------------------------------------------------------------
    def with_mask(self, out: SchedulerOutput) -> tuple[SchedulerOutput, dict[str, Exception]]:
        """``out`` with the bitmask of its constrained requests that sample this step; the requests whose
        matcher failed to fill one (they end alone). Drops the matchers of requests finished since."""
        for rid in out.finished_request_ids:  # every finish (stop, length, abort, failure) is reported here
            self._matchers.pop(rid, None)
        rows = [s.request_id for s in out.scheduled if s.sample and s.request_id in self._matchers]
        if not rows:
            return out, {}
        bitmask = torch.full((len(rows), -(-self.vocab_size // 32)), -1, dtype=torch.int32)  # all allowed
        failed: dict[str, Exception] = {}
        try:  # one call for the batch (xgrammar spreads big batches over threads)
            if self._batch is None:
                self._batch = _xgr().BatchGrammarMatcher("auto")
            self._batch.batch_fill_next_token_bitmask([self._matchers[r] for r in rows], bitmask)
        except Exception:
            logger.exception("batched grammar mask failed: filling %d rows one by one", len(rows))
            for i, rid in enumerate(rows):
                try:
                    self._matchers[rid].fill_next_token_bitmask(bitmask, i)
                except Exception as err:  # this request alone (its row stays all-allowed; it is ended)
                    failed[rid] = err
        return replace(out, grammar=GrammarMask(tuple(rows), bitmask)), failed

    def advance(self, request_id: str, token_ids: Sequence[int]) -> bool:
        """Feed the tokens the scheduler appended; True once the grammar is terminated (a stop token after a
        complete output). A token the grammar refuses raises ``RequestFailedError`` (the mask forbade it)."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        for t in token_ids:
            if matcher.is_terminated():
                break
            if not matcher.accept_token(t):
                raise RequestFailedError(f"token {t} does not follow the request's grammar")
        return matcher.is_terminated()
