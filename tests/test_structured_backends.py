"""Schemas xgrammar would not enforce: the llguidance backend, the check on the finished answer, re-sampling."""

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.infer.grammar import compile_grammar
from tunelab.infer.llguidance_backend import LLGrammar
from tunelab.infer.structured import MAX_RESAMPLES, GrammarState

V = 49152
OBJ = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}

# (keyword, schema, a document the schema accepts, one it rejects). Each compiles now (it was refused), and the
# grammar refuses the invalid document itself: llguidance enforces the keyword.
ENFORCED = [
    ("allOf", {"allOf": [{**OBJ, "required": ["a"]}, {"properties": {"b": {"type": "integer"}}}]}, '{"a":1}', '"x"'),
    ("$ref+required", {"$defs": {"A": OBJ}, "$ref": "#/$defs/A", "required": ["a"]}, '{"a":1}', "{}"),
    ("anyOf+required", {"anyOf": [{"type": "object"}], "required": ["a"]}, '{"a":1}', "{}"),
    ("pattern+maxLength", {"type": "string", "pattern": "^[a-z]+$", "maxLength": 2}, '"ab"', '"abcd"'),
    ("pattern+minLength", {"type": "string", "pattern": "^[a-z]+$", "minLength": 3}, '"abc"', '"ab"'),
    ("format+pattern", {"type": "string", "format": "date", "pattern": "^2020"}, '"2020-01-01"', '"2021-01-01"'),
    ("minimum without type", {"minimum": 5}, "6", "1"),
    ("multipleOf on a number", {"type": "number", "multipleOf": 0.5}, "1.5", "0.3"),
    ("$ref outside $defs", {"type": "object", "required": ["x"], "properties": {"x": {"$ref": "#/message/f"}},
                            "message": {"f": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 2}}},
     '{"x":"ab"}', '{"x":"abcd"}'),  # the audit follows a $ref anywhere
    ("pattern+maxLength beside other keywords", {"type": "object", "required": ["s"], "properties": {"s": {
        "type": "string", "pattern": "^x", "minLength": 2, "maxLength": 3, "description": "id"}}},
     '{"s":"xy"}', '{"s":"xyzw"}'),
]
# (keyword, schema, valid, invalid): no backend enforces these; the grammar leaves them open and the check on the
# finished answer refuses the invalid document (the engine then re-samples the row).
CHECKED = [
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,2]", "[1,1]"),
    ("not", {**OBJ, "properties": {"a": {"type": "integer", "not": {"const": 1}}}}, '{"a":2}', '{"a":1}'),
    ("if", {**OBJ, "required": ["a"], "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
     '{"a":1,"b":2}', '{"a":1}'),
    ("dependentRequired", {**OBJ, "dependentRequired": {"a": ["b"]}}, '{"a":1,"b":2}', '{"a":1}'),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[5]", "[1]"),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1.5", "1"),
    ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}, "additionalProperties": {  # `not`
        "type": "integer"}, "not": {"required": ["zz"]}}, '{"abc":1}', '{"abcd":1}'),  # takes it to llguidance
    ("pattern", {"type": "string", "pattern": "^(?!@@)[a-z@]+$"}, '"a@"', '"@@a"'),
    ("patternProperties", {"type": "object", "patternProperties": {"^(?!@@)[a-z@]+$": {"type": "integer"}}},
     '{"ab":1}', '{"ab":"x"}'),
]


def _accepts(grammar, tokenizer, doc: str) -> bool:
    m = grammar.matcher()
    return m.accept_tokens(tokenizer.encode(doc, add_special_tokens=False)) and m.is_completed()


@pytest.mark.parametrize("keyword,schema,valid,invalid", ENFORCED, ids=[e[0] for e in ENFORCED])
def test_newly_supported_keyword_is_enforced_by_the_grammar(tokenizer, keyword, schema, valid, invalid):
    check = jsonschema.validators.validator_for(schema)(schema)
    assert check.is_valid(json.loads(valid)) and not check.is_valid(json.loads(invalid))
    g = compile_grammar(tokenizer, schema=schema, vocab_size=V)
    assert isinstance(g, LLGrammar) and not g.post_checked
    assert _accepts(g, tokenizer, valid) and not _accepts(g, tokenizer, invalid)


@pytest.mark.parametrize("keyword,schema,valid,invalid", CHECKED, ids=[c[0] for c in CHECKED])
def test_keyword_no_backend_enforces_is_checked_on_the_answer(tokenizer, keyword, schema, valid, invalid):
    g = compile_grammar(tokenizer, schema=schema, vocab_size=V)
    assert keyword in [k for _, k in g.post_checked]
    assert _accepts(g, tokenizer, valid) and g.check(valid) == []
    assert g.check(invalid), "the check must refuse what the grammar lets through"


def test_required_key_without_properties_is_written(tokenizer):
    """Silent gap: a required key `properties` does not define was dropped by xgrammar's grammar (the answer
    then failed validation). normalise gives it the schema the object applies to it: still xgrammar, enforced."""
    import xgrammar as xgr

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "zz"],
              "additionalProperties": {"type": "string"}}
    g = compile_grammar(tokenizer, schema=schema, vocab_size=V)

    def accepts(doc):
        m = xgr.GrammarMatcher(g)
        return m.accept_string(doc) and m.is_completed()

    assert accepts('{"a":1,"zz":"x"}') and not accepts('{"a":1}') and not accepts('{"a":1,"zz":3}')
    st, ids = _random_run(g, 24, seed=0)
    doc = json.loads(tokenizer.decode(ids, skip_special_tokens=True))
    jsonschema.validate(doc, schema)


def test_unsatisfiable_schema_is_refused_by_keyword_and_why(tokenizer):
    with pytest.raises(TunelabError, match=r"keyword 'required'.*unsatisfiable"):
        compile_grammar(tokenizer, schema={"type": "object", "required": ["a"], "additionalProperties": False},
                        vocab_size=V)


def test_an_unsatisfiable_definition_only_drops_the_optional_property_using_it(tokenizer):
    """llguidance refuses a whole schema for one unsatisfiable definition; used by an optional property, it
    becomes `false` (the property is left out), used by a required one, the schema is refused."""
    bad = {"type": "object", "required": ["id"], "additionalProperties": False}
    schema = {"type": "object", "required": ["a"], "definitions": {"bad": bad}, "properties": {
        "a": {"type": "integer"}, "x": {"$ref": "#/definitions/bad"}}}
    g = compile_grammar(tokenizer, schema=schema, vocab_size=V)
    assert _accepts(g, tokenizer, '{"a":1}') and not _accepts(g, tokenizer, '{"a":1,"x":{}}')
    with pytest.raises(TunelabError, match=r"keyword '\w+': unsatisfiable"):
        compile_grammar(tokenizer, schema={**schema, "required": ["a", "x"]}, vocab_size=V)


def test_remote_ref_is_still_refused(tokenizer):
    with pytest.raises(TunelabError, match=re.escape("keyword '$ref'")):
        compile_grammar(tokenizer, schema={"type": "object", "properties": {"x": {
            "$ref": "https://example.com/s.json"}}}, vocab_size=V)


def _random_run(grammar, budget: int, seed: int, pick=None):
    """A random "model" under the state, as in test_structured (uniform over allowed tokens, half the time a
    short one); `pick(allowed)` overrides the choice."""
    import xgrammar as xgr

    rng = np.random.default_rng(seed)
    bitmask = xgr.allocate_token_bitmask(1, V)
    st, ids = GrammarState(grammar, budget, slack=0, seed=seed), []
    while len(ids) < budget and not st.is_terminated():
        tok = st.forced_token(budget - len(ids))
        if tok is None:
            st.fill_mask(bitmask, 0)
            allowed = np.flatnonzero(np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[:V])
            short = allowed[allowed < 2000]
            tok = pick(allowed) if pick else int(rng.choice(short if len(short) and rng.random() < 0.5 else allowed))
            tok = st.vet(tok, budget - len(ids))
        st.accept(tok)
        ids.append(tok)
    return st, ids


NESTED_LL = {"type": "object", "required": ["name", "tags", "v", "n"], "properties": {
    "name": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 6},
    "tags": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "uniqueItems": True},
    "v": {"allOf": [{"type": "object", "required": ["x"], "properties": {"x": {"type": "integer"}}},
                    {"required": ["y"], "properties": {"y": {"type": "boolean"}}}]},
    "n": {"minimum": 3, "maximum": 9}}}


def test_length_closed_holds_on_the_llguidance_backend(tokenizer):
    """Fuzz: whenever the closer's path from the start fits the budget, every answer is a complete document
    that the grammar enforces (all but uniqueItems), within the budget, closed early at the small budgets."""
    g = compile_grammar(tokenizer, schema=NESTED_LL, vocab_size=V)
    assert isinstance(g, LLGrammar)
    loose = {**NESTED_LL, "properties": {**NESTED_LL["properties"], "tags": {"type": "array", "items": {
        "type": "integer"}, "minItems": 2}}}
    reasons = set()
    for budget in (30, 40, 56, 80):
        for seed in range(4):
            st, ids = _random_run(g, budget, seed)
            assert len(ids) <= budget and st.fits
            doc = json.loads(tokenizer.decode(ids, skip_special_tokens=True))
            jsonschema.validate(doc, loose)
            assert st.finish_reason in ("stop", "length_closed")
            assert st.report()["valid"] == (g.check(json.dumps(doc, separators=(",", ":"))) == [])
            reasons.add(st.finish_reason)
    assert "length_closed" in reasons


def test_a_row_that_fails_the_check_is_drawn_again_then_closed(tokenizer):
    """A "model" that always writes the same item breaks uniqueItems: the state re-samples MAX_RESAMPLES
    times (noise it ignores), then takes the closer's document, which passes; the report says so."""
    import xgrammar as xgr

    schema = {"type": "array", "items": {"enum": [7, 8, 9]}, "minItems": 2, "maxItems": 2, "uniqueItems": True}
    g = compile_grammar(tokenizer, schema=schema, vocab_size=V)
    seven = tokenizer.encode("7", add_special_tokens=False)[0]
    bitmask = xgr.allocate_token_bitmask(1, V)
    st, texts = GrammarState(g, 16, slack=0), []
    while True:
        ids = []
        while not st.is_terminated() and len(ids) < 16:
            tok = st.forced_token(16 - len(ids))
            if tok is None:
                st.fill_mask(bitmask, 0)
                allowed = np.flatnonzero(np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[:V])
                tok = st.vet(seven if seven in allowed else int(allowed[0]), 16 - len(ids))
            st.accept(tok)
            ids.append(tok)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        if not st.resample():
            break
    assert texts[:-1] == ["[7,7]"] * (MAX_RESAMPLES + 1)
    rep = st.report()
    assert rep["closed"] and rep["resampled"] == MAX_RESAMPLES + 1 and rep["valid"], texts
    jsonschema.validate(json.loads(texts[-1]), schema)
    assert st.finish_reason == "length_closed"


def test_batched_engine_resamples_the_failing_row_and_reports_it(tiny_llama):
    """A random tiny model through the batched engine: rows whose answer breaks uniqueItems are drawn again
    (seeded); every completion's grammar report says whether it is valid, and says so truly."""
    from tunelab.infer import Request, SamplingParams
    from tunelab.infer.engine import BatchEngine

    torch.manual_seed(0)
    model, tok = tiny_llama
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "minItems": 3,
              "maxItems": 3, "uniqueItems": True}
    engine = BatchEngine(model, tok)
    g = engine.compile_grammar(schema=schema)
    reqs = [Request([{"role": "user", "content": f"numbers {i}"}], params=SamplingParams(
        grammar=g, max_new_tokens=24, seed=i)) for i in range(6)]
    out = engine.generate(reqs)
    again = engine.generate([Request(r.prompt, params=r.params) for r in reqs])
    assert [c.text for c in out] == [c.text for c in again]  # seeded: the re-samples repeat
    for c in out:
        rep = c.grammar
        assert rep["backend"] == "llguidance" and "uniqueItems at /uniqueItems" in rep["post_checked"]
        valid = jsonschema.validators.validator_for(schema)(schema).is_valid(json.loads(c.text))
        assert rep["valid"] == valid and c.finish_reason in ("stop", "length_closed")
    assert any(c.grammar["resampled"] for c in out)
    assert sum(c.grammar["valid"] for c in out) >= 5


def test_xgrammar_rows_report_too(tiny_llama):
    from tunelab.infer import Request, SamplingParams
    from tunelab.infer.engine import BatchEngine

    model, tok = tiny_llama
    engine = BatchEngine(model, tok)
    g = engine.compile_grammar(schema={"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}})
    (c,) = engine.generate([Request("x", params=SamplingParams(grammar=g, max_new_tokens=16))])
    assert c.grammar == {"backend": "xgrammar", "resampled": 0, "closed": False, "valid": True}
    (plain,) = engine.generate([Request("x", params=SamplingParams(max_new_tokens=4))])
    assert plain.grammar is None
