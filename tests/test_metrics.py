"""Every metric against hand-computed values, including empty, unicode, nested JSON and SQL edge cases."""

import json
import sqlite3
import time

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import METRICS, MetricResult, check_inputs, get_metric
from tunelab.evaluate.metrics.overlap import bleu, chrf, corpus_bleu, rouge_l
from tunelab.evaluate.metrics.refusal import refusal
from tunelab.evaluate.metrics.sql import has_top_level_order_by, sql_exec, sql_exec_result, sql_valid
from tunelab.evaluate.metrics.structured import (
    field_f1,
    field_f1_lenient,
    flatten,
    json_exact,
    json_exact_lenient,
    json_valid,
    json_valid_lenient,
    schema_valid,
    schema_valid_lenient,
    schema_valid_result,
)
from tunelab.evaluate.metrics.text import contains, exact_match, regex

# --- text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("output,reference,opts,expected", [
    ("  Hello \n  World ", "hello world", {}, 1.0),
    ("Hello, world!", "hello world", {}, 0.0),
    ("Hello, world!", "hello world", {"punctuation": True}, 1.0),
    ("Hello", "hello", {"casefold": False}, 0.0),
    ("a  b", "a b", {"whitespace": False}, 0.0),
    ("cafe\u0301", "café", {}, 1.0),  # decomposed vs composed é (NFC)
    ("Straße", "STRASSE", {}, 1.0),  # casefold folds ß to ss
    ("«Oui»", "oui", {"punctuation": True}, 1.0),  # Unicode punctuation categories
    ("", "", {}, 1.0),
    ("", "x", {}, 0.0),
    ('{"a":1}', {"a": 1}, {}, 1.0),  # non-string reference compared as compact JSON
])
def test_exact_match(output, reference, opts, expected):
    assert exact_match(output, reference, **opts) == expected


def test_contains_and_regex():
    assert contains("The capital is  PARIS.", "capital is paris") == 1.0
    assert contains("", "x") == 0.0
    assert contains("Berlin", "Paris") == 0.0
    assert regex("year 2024, month 5", r"\d{4}") == 1.0
    assert regex("year 2024", r"\d{4}", fullmatch=True) == 0.0
    assert regex(" 2024 ", r"\d{4}", fullmatch=True) == 1.0  # output stripped
    assert regex("ÉTÉ", "été", ignorecase=True) == 1.0
    assert regex("", "a") == 0.0


# --- JSON ---------------------------------------------------------------------------------------

FENCED = 'Sure, here it is:\n```json\n{"name": "pen", "qty": 2}\n```\nAnything else?'
PROSE = 'The order is {"name": "pen", "qty": 2} as requested.'


@pytest.mark.parametrize("output,strict,lenient", [
    ('{"a": 1}', 1.0, 1.0),
    ('  [1, 2]\n', 1.0, 1.0),
    ('"just a string"', 1.0, 1.0),
    (FENCED, 0.0, 1.0),
    (PROSE, 0.0, 1.0),
    ("```\n[1, 2]\n```", 0.0, 1.0),  # plain fence
    ("", 0.0, 0.0),
    ("NaN", 0.0, 0.0),  # not RFC 8259 JSON
    ('{"a": 1,}', 0.0, 0.0),
    ("{broken} then [3]", 0.0, 1.0),  # first embedded value that parses
    ('{"name": "ünï 😀", "nested": {"deep": [{"x": null}]}}', 1.0, 1.0),
])
def test_json_valid_strict_vs_lenient(output, strict, lenient):
    assert json_valid(output) == strict
    assert json_valid_lenient(output) == lenient


SCHEMA = {
    "type": "object",
    "required": ["name", "qty"],
    "properties": {"name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
    "additionalProperties": False,
}


def test_schema_valid():
    assert schema_valid('{"name": "pen", "qty": 2}', schema=SCHEMA) == 1.0
    assert schema_valid('{"name": "pen", "qty": 0}', schema=SCHEMA) == 0.0
    assert schema_valid('{"name": "pen"}', schema=SCHEMA) == 0.0
    assert schema_valid("", schema=SCHEMA) == 0.0
    assert schema_valid(FENCED, schema=SCHEMA) == 0.0
    assert schema_valid_lenient(FENCED, schema=SCHEMA) == 1.0
    result = schema_valid_result('{"name": "pen", "qty": 0}', schema=SCHEMA)
    assert result.score == 0.0 and result.detail.startswith("qty:") and "minimum" in result.detail


def test_schema_valid_uses_draft_2020_12():
    # prefixItems is a 2020-12 keyword: an older draft would ignore it and call this valid.
    schema = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}
    assert schema_valid('["a", 1]', schema=schema) == 1.0
    assert schema_valid('["a", "b"]', schema=schema) == 0.0


@pytest.mark.parametrize("output,reference,expected", [
    ('{"b": 2, "a": 1}', {"a": 1, "b": 2}, 1.0),  # key order ignored
    ('{"b": 2, "a": 1}', '{"a": 1, "b": 2}', 1.0),  # reference as JSON text
    ('{"a": 1.0}', {"a": 1}, 1.0),  # same JSON number
    ('{"a": true}', {"a": 1}, 0.0),  # true is not 1
    ('{"a": "1"}', {"a": 1}, 0.0),
    ("[1, 2]", [2, 1], 0.0),  # list order matters
    ('{"x": {"y": [{"z": "é"}]}}', {"x": {"y": [{"z": "é"}]}}, 1.0),
    ('{"x": {"y": [{"z": "e"}]}}', {"x": {"y": [{"z": "é"}]}}, 0.0),
    ("", {}, 0.0),
    ("null", None, 1.0),
])
def test_json_exact(output, reference, expected):
    assert json_exact(output, reference) == expected


def test_json_exact_lenient():
    assert json_exact(FENCED, {"qty": 2, "name": "pen"}) == 0.0
    assert json_exact_lenient(FENCED, {"qty": 2, "name": "pen"}) == 1.0
    assert json_exact_lenient(PROSE, {"qty": 3, "name": "pen"}) == 0.0


ORDER = {"customer": "Ann", "items": [{"product": "pen", "qty": 2}, {"product": "ink", "qty": 1}]}


def test_flatten_paths():
    assert set(flatten(ORDER)) == {("customer",), ("items", 0, "product"), ("items", 0, "qty"),
                                   ("items", 1, "product"), ("items", 1, "qty")}
    assert flatten({"a": {}, "b": []}) == {("a",): ("obj", ()), ("b",): ("arr", ())}


def test_field_f1():
    # predicted pairs: customer=Ann, items.0.product=pen, items.0.qty=3 -> 2 of 3 correct (P = 2/3);
    # reference has 5 pairs (R = 2/5); F1 = 2 * (2/3) * (2/5) / (2/3 + 2/5) = 0.5
    pred = '{"customer": "Ann", "items": [{"product": "pen", "qty": 3}]}'
    assert field_f1(pred, ORDER) == pytest.approx(0.5)
    assert field_f1('{"customer": "Ann", "items": [{"qty": 2, "product": "pen"}, {"product": "ink", "qty": 1}]}',
                    ORDER) == 1.0
    # lists are indexed: the same items in swapped order only match on customer (P = R = 1/5)
    swapped = '{"customer": "Ann", "items": [{"product": "ink", "qty": 1}, {"product": "pen", "qty": 2}]}'
    assert field_f1(swapped, ORDER) == pytest.approx(0.2)
    assert field_f1("{}", {}) == 1.0
    assert field_f1("{}", {"a": 1}) == 0.0
    assert field_f1('{"名前": "ペン"}', {"名前": "ペン", "数": 2}) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert field_f1("", ORDER) == 0.0
    fenced = "```json\n" + pred + "\n```"
    assert field_f1(fenced, ORDER) == 0.0
    assert field_f1_lenient(fenced, ORDER) == pytest.approx(0.5)


# --- overlap ------------------------------------------------------------------------------------


def test_rouge_l():
    # LCS("the cat is on the mat", "the cat sat on the mat") = the cat on the mat = 5 of 6 words each way
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("The Cat", "the cat") == 1.0
    # Greek: the library's default tokenizer would drop every letter and score 0; LCS = 1 of 2 words
    assert rouge_l("γάτα κάθεται", "γάτα τρέχει") == pytest.approx(0.5)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l('{"a": 1}', {"a": 1}) == 1.0  # non-string reference as JSON text


def test_bleu():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (BP = 1): (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(expected, abs=1e-6)
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bleu("dog", "the cat sat on the mat") == 0.0
    assert bleu("", "") == 1.0
    assert corpus_bleu(["a b c d", "e f g h"], ["a b c d", "e f g h"]) == pytest.approx(1.0)


def test_chrf():
    # char 1-grams: P = R = 1/2; 2-grams: 0 of 1; higher orders absent -> mean P = mean R = 1/4 -> F = 0.25
    assert chrf("ab", "ac") == pytest.approx(0.25)
    assert chrf("naïve café", "naïve café") == pytest.approx(1.0)
    assert chrf("", "x") == 0.0
    assert chrf("", "") == 1.0


# --- refusal ------------------------------------------------------------------------------------


@pytest.mark.parametrize("output,expected", [
    ("I'm sorry, but I can't help with that.", 1.0),
    ("I\u2019m sorry, but I can\u2019t help with that.", 1.0),  # curly apostrophes
    ("  i cannot do that", 1.0),
    ("As an AI language model, I have no opinions.", 1.0),
    ("Thanks for asking. Unfortunately I cannot provide that information.", 1.0),
    ("Sure! Here is the JSON: {}", 0.0),
    ("The answer is 4. I'm sorry to hear about the trouble.", 0.0),  # apology mid-answer
    ("", 0.0),
])
def test_refusal(output, expected):
    assert refusal(output) == expected


def test_refusal_extendable():
    assert refusal("Nope, not doing that.") == 0.0
    assert refusal("Nope, not doing that.", extra_prefixes=["Nope"]) == 1.0
    assert refusal("Well... that is outside my remit.", extra_patterns=[r"outside my remit"]) == 1.0


# --- SQL ----------------------------------------------------------------------------------------


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "shop db.sqlite"  # a space: the read-only URI must be encoded
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL);
        INSERT INTO items (name, qty, price) VALUES
            ('pen', 2, 1.5), ('ink', 5, 3.0), ('pen', 2, 1.5), ('ruler', 1, 2.25), ('crème', 3, 4.0);
    """)
    conn.commit()
    conn.close()
    return path


def test_sql_exec_multiset_without_order_by(db):
    gold = "SELECT name, qty FROM items"
    assert sql_exec("SELECT name, qty FROM items ORDER BY name DESC", gold, db=db) == 1.0
    # duplicate rows count: DISTINCT drops one ('pen', 2)
    result = sql_exec_result("SELECT DISTINCT name, qty FROM items", gold, db=db)
    assert result == MetricResult(0.0, "wrong result: 4 rows, expected 5")
    assert sql_exec("SELECT name FROM items", gold, db=db) == 0.0  # columns differ


def test_sql_exec_order_matters_only_with_top_level_order_by(db):
    gold = "SELECT name FROM items WHERE name <> 'pen' ORDER BY qty"
    assert sql_exec("SELECT name FROM items WHERE name != 'pen' ORDER BY qty ASC", gold, db=db) == 1.0
    result = sql_exec_result("SELECT name FROM items WHERE name <> 'pen' ORDER BY qty DESC", gold, db=db)
    assert result.score == 0.0 and "wrong order" in result.detail
    # ORDER BY only inside a subquery does not order the result: compared as a multiset
    sub = "SELECT name FROM (SELECT name FROM items WHERE name <> 'pen' ORDER BY qty)"
    assert sql_exec("SELECT name FROM items WHERE name <> 'pen' ORDER BY qty DESC", sub, db=db) == 1.0


@pytest.mark.parametrize("sql,expected", [
    ("SELECT a FROM t ORDER BY a", True),
    ("select a from t order\n  by a desc", True),
    ("SELECT a FROM (SELECT a FROM t ORDER BY a)", False),
    ("SELECT a, row_number() OVER (ORDER BY a) FROM t", False),
    ("SELECT 'order by' FROM t -- order by a", False),
    ("WITH x AS (SELECT a FROM t ORDER BY a) SELECT a FROM x ORDER BY a", True),
])
def test_has_top_level_order_by(sql, expected):
    assert has_top_level_order_by(sql) is expected


def test_sql_exec_errors_score_zero_with_detail(db):
    gold = "SELECT name FROM items"
    for pred, needle in [
        ("SELEC name FROM items", "syntax error"),
        ("SELECT name FROM nowhere", "no such table"),
        ("", "empty SQL"),
        ("   ", "empty SQL"),
        ("SELECT 1; SELECT 2", "one statement"),
    ]:
        result = sql_exec_result(pred, gold, db=db)
        assert result.score == 0.0 and needle in result.detail, (pred, result)


def test_sql_exec_read_only(db):
    result = sql_exec_result("DELETE FROM items", "SELECT name FROM items", db=db)
    assert result.score == 0.0 and "readonly" in result.detail
    assert sql_valid(f"ATTACH DATABASE '{db.parent / 'other.sqlite'}' AS o", db=db) == 0.0
    assert not (db.parent / "other.sqlite").exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (5,)


def test_sql_exec_timeout(db):
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    start = time.monotonic()
    result = sql_exec_result(forever, "SELECT 1", db=db, timeout=0.2)
    assert time.monotonic() - start < 3
    assert result == MetricResult(0.0, "timed out after 0.2 s")


def test_sql_exec_float_rounding_and_unicode(db):
    assert sql_exec("SELECT 0.3", "SELECT 0.1 + 0.2", db=db) == 1.0
    assert sql_exec("SELECT name FROM items WHERE name = 'crème'", "SELECT 'crème'", db=db) == 1.0


def test_sql_gold_failure_raises(db, tmp_path):
    with pytest.raises(TunelabError, match="gold SQL fails"):
        sql_exec("SELECT 1", "SELECT nope FROM items", db=db)
    with pytest.raises(TunelabError, match="does not exist"):
        sql_exec("SELECT 1", "SELECT 1", db=tmp_path / "missing.sqlite")


def test_sql_valid(db):
    assert sql_valid("SELECT qty FROM items", db=db) == 1.0  # runs, whatever it returns
    assert sql_valid("SELECT qty FROM", db=db) == 0.0


# --- registry -----------------------------------------------------------------------------------


def test_registry_names_and_needs(db):
    assert {"exact_match", "json_valid", "json_valid_lenient", "schema_valid", "schema_valid_lenient", "json_exact",
            "json_exact_lenient", "field_f1", "field_f1_lenient", "rouge_l", "bleu", "chrf", "sql_exec",
            "contains", "regex", "refusal"} <= set(METRICS)
    assert METRICS["schema_valid"].needs == ("schema",) and METRICS["sql_exec"].needs == ("db",)
    assert all(m.summary for m in METRICS.values())
    assert METRICS["json_valid"].compute("{", None).detail.startswith("not JSON")
    assert METRICS["exact_match"].compute("a", "A") == MetricResult(1.0, None)
    assert METRICS["sql_exec"].compute("SELECT 1", "SELECT 1", db=db) == MetricResult(1.0, None)


def test_registry_errors():
    with pytest.raises(TunelabError, match="Valid metrics: exact_match"):
        get_metric("accuracy")
    with pytest.raises(TunelabError, match="--db"):
        check_inputs("sql_exec")
    with pytest.raises(TunelabError, match="--schema"):
        check_inputs("schema_valid_lenient", db="x")


def test_task_files_can_name_every_metric():
    from typing import get_args

    from tunelab.config.task import MetricName

    assert set(get_args(MetricName)) == set(METRICS)


def test_json_metrics_name_the_missing_and_wrong_fields():
    ref = {"customer": {"name": "Ada", "email": "a@x.io"}, "items": [{"sku": "A1", "qty": 3}]}
    out = json.dumps({"customer": {"name": "Ada"}, "items": [{"sku": "A1", "qty": 2}], "note": "hi"})
    for name in ("json_exact", "field_f1"):
        result = METRICS[name].compute(out, ref)
        assert result.detail == "missing customer.email; wrong items.0.qty (2, expected 3); extra note", name
    assert METRICS["json_exact"].compute(json.dumps(ref), ref) == MetricResult(1.0)
