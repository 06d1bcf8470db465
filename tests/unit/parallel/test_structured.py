"""Structured output on the native engine, on the shipped tokenizer (vocab 4096) and xgrammar itself: specs and
their bounds, errors naming the field, the step's bitmask equal to a fresh xgrammar matcher's, masking by
request id, and whole generations through the engine that follow their schema, regex or choice, also across
preemption (recompute), chunked prefill, a grammar still compiling, and ignore_eos."""

from __future__ import annotations

import doctest
import json
import re

import jsonschema
import pytest
import torch
import xgrammar as xgr
from tokenizers import Tokenizer

from parallel import structured, structured_spec
from parallel.config import EngineConfig
from parallel.engine import LLMEngine
from parallel.errors import InvalidRequestError
from parallel.sampling_params import SamplingParams
from parallel.step_messages import GrammarMask, ScheduledRequest, SchedulerOutput
from parallel.structured import GrammarBackend, apply_mask, choice_grammar, parse
from parallel.structured_spec import MAX_NESTING, MAX_SCHEMA_BYTES, StructuredSpec
from tests.conftest import REPO

TINY = str(REPO / "models" / "tiny-code-llama")
TOKENIZER = Tokenizer.from_file(f"{TINY}/tokenizer.json")
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
    "required": ["name", "age", "ok", "color"], "additionalProperties": False}


def _deep(n: int) -> dict:
    s: dict = {"type": "integer"}
    for _ in range(n):
        s = {"type": "array", "items": s}
    return s


def test_doctests():
    assert doctest.testmod(structured_spec).failed == 0
    assert doctest.testmod(structured, optionflags=doctest.ELLIPSIS).failed == 0


def test_specs_are_keys_whatever_the_spelling_and_field():
    a = StructuredSpec.json_schema(SCHEMA, "response_format")
    b = StructuredSpec("json", json.dumps(SCHEMA, indent=2), param="guided_json")
    assert a == b and hash(a) == hash(b) and a.param != b.param
    assert json.loads(a.value) == SCHEMA and list(json.loads(a.value)["properties"]) == list(SCHEMA["properties"])
    assert StructuredSpec.from_options({"choice": ["a", "b"]}).choices == ("a", "b")
    assert SamplingParams(structured={"regex": "x+"}).structured == StructuredSpec("regex", "x+")


@pytest.mark.parametrize("make, param", [
    (lambda: StructuredSpec("xml", "x"), "structured_outputs"),
    (lambda: StructuredSpec("regex", "a" * 20_000, param="guided_regex"), "guided_regex"),
    (lambda: StructuredSpec("regex", "a\x00"), "structured_outputs"),
    (lambda: StructuredSpec("grammar", " "), "structured_outputs"),
    (lambda: StructuredSpec("choice", choices=()), "structured_outputs"),
    (lambda: StructuredSpec("choice", choices=("",)), "structured_outputs"),
    (lambda: StructuredSpec("choice", choices=tuple("x" * 3 for _ in range(2000))), "structured_outputs"),
    (lambda: StructuredSpec("json", "[1, 2]", param="response_format"), "response_format"),
    (lambda: StructuredSpec("json", "{not json", param="response_format"), "response_format"),
    (lambda: StructuredSpec.json_schema(_deep(MAX_NESTING + 1), "response_format"), "response_format"),
    (lambda: StructuredSpec.json_schema({"enum": ["x" * 1000] * (MAX_SCHEMA_BYTES // 900)}, "tools"), "tools"),
    (lambda: StructuredSpec.from_options({"json": {}, "regex": "a"}), "structured_outputs"),
    (lambda: StructuredSpec.from_options({"jsn": {}}, "structured_outputs"), "structured_outputs"),
    (lambda: SamplingParams(structured="json"), "structured"),
])
def test_bounds_are_typed_errors_naming_the_field(make, param):
    with pytest.raises(InvalidRequestError) as err:
        make()
    assert err.value.param == param


@pytest.mark.parametrize("spec, says", [
    (StructuredSpec("regex", "(abc", param="guided_regex"), "parenthesis"),
    (StructuredSpec("json", '{"type": "foo"}', param="response_format"), "Unsupported type"),
    (StructuredSpec("grammar", "root ::= foo", param="guided_grammar"), "not defined"),
    (StructuredSpec("json", '{"type": "integer", "multipleOf": 3}', param="tools"), "multipleOf"),
    (StructuredSpec("json", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
])
def test_what_xgrammar_cannot_take_is_a_400_naming_the_field(spec, says):
    with pytest.raises(InvalidRequestError) as err:
        parse(spec)
    assert err.value.param == spec.param and says in err.value.message and "/project/" not in err.value.message


def test_choices_are_escaped_as_vllm_does():
    choices = ['say "hi"', "back\\slash", "new\nline", "tab\t", "bell\x07"]
    pytest.importorskip("vllm")
    from vllm.v1.structured_output.utils import choice_as_grammar

    assert choice_grammar(choices) == choice_as_grammar(choices)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(_info()).compile_grammar(parse(StructuredSpec(
        "choice", choices=tuple(choices)))))
    assert matcher.accept_string("new\nline") and matcher.is_completed()


def _info() -> xgr.TokenizerInfo:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=TOKENIZER)
    return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=4096, stop_token_ids=[2])


def _scheduled(rid: str, sample: bool = True) -> ScheduledRequest:
    return ScheduledRequest(rid, (5,), 0, (0,), sample, SamplingParams())


def test_the_step_mask_is_xgrammars_own_and_rows_match_by_request_id():
    backend = GrammarBackend(TINY, 4096, (2,))
    spec, digits = StructuredSpec.json_schema(SCHEMA), StructuredSpec("regex", "[0-9]+")
    backend.compile(spec).result(), backend.compile(digits).result()
    assert backend.admit(spec, "a") and backend.admit(digits, "b")  # compiled: ready at once
    ref = xgr.GrammarMatcher(xgr.GrammarCompiler(_info()).compile_grammar(parse(spec)))
    tokens = TOKENIZER.encode('{"name":"x', add_special_tokens=False).ids
    assert all(ref.accept_token(t) for t in tokens) and not backend.advance("a", tokens)
    out, failed = backend.with_mask(SchedulerOutput((_scheduled("plain"), _scheduled("b"), _scheduled("a"),
                                                     _scheduled("a-prefill", False)), frozenset()))
    assert not failed and out.grammar is not None and out.grammar.request_ids == ("b", "a")
    expect = xgr.allocate_token_bitmask(1, 4096)
    ref.fill_next_token_bitmask(expect, 0)
    assert torch.equal(out.grammar.bitmask[1], expect[0])
    # the runner's rows are in its own order: masking goes by request id, unconstrained rows untouched
    logits = torch.randn(3, 4096)
    masked = apply_mask(logits.clone(), ["a", "plain", "b"], out.grammar)
    assert torch.equal(masked[1], logits[1])
    allowed = torch.tensor([bool(expect[0, t // 32] >> (t % 32) & 1) for t in range(4096)])
    assert torch.equal(torch.isinf(masked[0]), ~allowed) and torch.equal(masked[0][allowed], logits[0][allowed])
    allowed_b = [t for t in range(4096) if not torch.isinf(masked[2, t])]
    assert allowed_b and all(TOKENIZER.decode([t]).isdigit() for t in allowed_b)
    same_order = apply_mask(logits[[2, 0]].clone(), ["b", "a"], out.grammar)  # every row constrained: fast path
    assert torch.equal(same_order, masked[[2, 0]])
    # a finished request's matcher goes with the next step that reports it
    backend.with_mask(SchedulerOutput((), frozenset({"a", "b"})))
    assert backend.with_mask(SchedulerOutput((_scheduled("a"),), frozenset()))[0].grammar is None


def test_a_mask_for_no_row_of_this_step_changes_nothing():
    logits = torch.randn(2, 64)
    mask = GrammarMask(("elsewhere",), torch.zeros(1, 2, dtype=torch.int32))
    assert apply_mask(logits, ["a", "b"], mask) is logits and apply_mask(logits, ["a"], None) is logits


# ---- through the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig.from_options(TINY, dtype="float32", max_num_seqs=16,
                                               kv_cache_memory_bytes=64 << 20))


def _run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict[str, tuple[str, str]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    text: dict[str, str] = {}
    done: dict[str, tuple[str, str]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            assert d.error is None, d.error
            text[d.request_id] = text.get(d.request_id, "") + d.text
            if d.finished:
                done[d.request_id] = (text[d.request_id], d.finish_reason)
    return done


def test_generations_follow_their_schema_regex_and_choice(engine):
    # finite languages: a (nearly) random model has to end them
    specs = {"json": StructuredSpec.json_schema(SCHEMA),
             "regex": StructuredSpec("regex", r"[a-z]{2,6}@[a-z]{2,5}\.com"),
             "choice": StructuredSpec("choice", choices=("yes", "no", "maybe")),
             "ebnf": StructuredSpec("grammar", 'root ::= "(" [0-9] [0-9]? ")"'),
             "lark": StructuredSpec("grammar", 'start: "a" ("b" | "cc")')}
    done = _run(engine, {f"{k}{i}": ("def f(x):", SamplingParams(max_tokens=80, seed=i, structured=s))
                         for i in range(4) for k, s in specs.items()})
    for rid, (text, reason) in done.items():
        assert reason == "stop", (rid, text)
        if rid.startswith("json"):
            jsonschema.validate(json.loads(text), SCHEMA)
        elif rid.startswith("regex"):
            assert re.fullmatch(r"[a-z]{2,6}@[a-z]{2,5}\.com", text)
        elif rid.startswith("choice"):
            assert text in ("yes", "no", "maybe")
        elif rid.startswith("ebnf"):
            assert re.fullmatch(r"\([0-9]{1,2}\)", text)
        else:
            assert text in ("ab", "acc")


def test_json_object_is_json_when_stopped_and_a_prefix_when_cut(engine):
    done = _run(engine, {f"o{i}": ("x = ", SamplingParams(max_tokens=24, seed=i, structured=StructuredSpec(
        "json_object"))) for i in range(8)})
    compiled = xgr.GrammarCompiler(_info()).compile_builtin_json_grammar()  # any JSON, any whitespace
    for text, reason in done.values():
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length" and text.startswith("{") and xgr.GrammarMatcher(compiled).accept_string(text)


def test_preemption_and_chunked_prefill_keep_the_matchers_right():
    # 12 blocks of 16 tokens for 6 requests of ~80 tokens: running requests are preempted and recomputed;
    # a 100-token prompt is prefilled in chunks of 32.
    eng = LLMEngine(EngineConfig.from_options(TINY, dtype="float32", max_num_seqs=6, num_blocks=14,
                                              block_size=16, max_num_batched_tokens=32))
    spec = StructuredSpec.json_schema(SCHEMA)
    prompt = "def handler(request, response, *args, **kwargs):\n    " * 3
    done = _run(eng, {f"p{i}": (prompt, SamplingParams(max_tokens=100, seed=i, structured=spec)) for i in range(6)})
    assert eng.scheduler.num_preemptions > 0
    for text, reason in done.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_complete_grammar_ends_its_request_even_under_ignore_eos(engine):
    params = SamplingParams(max_tokens=50, seed=1, ignore_eos=True, structured=StructuredSpec("choice",
                                                                                               choices=("yes",)))
    (text, reason), = _run(engine, {"e": ("q", params)}).values()
    assert (text, reason) == ("yes", "stop")


def test_a_request_waits_outside_the_batch_while_its_grammar_compiles(engine):
    spec = StructuredSpec.json_schema({"type": "object", "properties": {"k": {"enum": ["compiling", "late"]}},
                                       "required": ["k"], "additionalProperties": False})
    engine.add_request("w", "a", SamplingParams(max_tokens=20, structured=spec))
    engine.add_request("plain", "a", SamplingParams(max_tokens=3))
    waited = engine.grammar.num_waiting
    done = _run(engine, {})
    assert waited in (0, 1) and json.loads(done["w"][0])["k"] in ("compiling", "late") and "plain" in done
    engine.add_request("gone", "a", SamplingParams(max_tokens=20, structured=StructuredSpec("regex", "[a-c]{9}")))
    assert engine.abort("gone") is not None and not _run(engine, {}) and not engine.has_unfinished()


def test_bad_specs_are_refused_at_admission_and_the_engine_goes_on(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", "a", SamplingParams(structured=StructuredSpec("regex", "(a", param="guided_regex")))
    assert err.value.param == "guided_regex" and not engine.has_unfinished()
    done = _run(engine, {"ok": ("a", SamplingParams(max_tokens=5, structured=StructuredSpec("regex", "[0-9]{3}")))})
    assert re.fullmatch("[0-9]{3}", done["ok"][0])


def test_structured_output_is_refused_with_speculative_decoding():
    eng = LLMEngine(EngineConfig.from_options(TINY, dtype="float32", max_num_seqs=2, kv_cache_memory_bytes=16 << 20,
                                              draft_path=str(REPO / "models" / "tiny-code-llama-draft"),
                                              num_speculative_tokens=2))
    with pytest.raises(InvalidRequestError) as err:
        eng.add_request("s", "a", SamplingParams(structured=StructuredSpec("regex", "a", param="response_format")))
    assert err.value.param == "response_format" and err.value.code == "unsupported_parameter"
