"""bootstrap CIs, scoring files and lists (with every input error raised before scoring), failure classes."""

import json
import sqlite3

import numpy as np
import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate import scoring
from tunelab.evaluate.failures import CLASSES, classify, count_classes
from tunelab.evaluate.scoring import bootstrap_ci, score_examples, score_files


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --- bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_ci_constant_and_single():
    assert bootstrap_ci([0.7] * 20) == pytest.approx((0.7, 0.7))
    assert bootstrap_ci([1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_bootstrap_ci_matches_normal_approximation():
    # 50 ones, 50 zeros: mean 0.5, standard error 0.5 / sqrt(100) = 0.05 -> 95% CI about 0.5 +- 0.098
    lo, hi = bootstrap_ci([1.0, 0.0] * 50)
    assert 0.38 < lo < 0.44 and 0.56 < hi < 0.62
    assert bootstrap_ci([1.0, 0.0] * 50, seed=0) == (lo, hi)  # deterministic
    assert bootstrap_ci([1.0, 0.0] * 50, alpha=0.5) != (lo, hi)
    lo50, hi50 = bootstrap_ci([1.0, 0.0] * 50, alpha=0.5)
    assert lo < lo50 < 0.5 < hi50 < hi


def test_bootstrap_ci_chunking_does_not_change_result(monkeypatch):
    values = list(np.random.default_rng(1).random(37))
    whole = bootstrap_ci(values, n_resamples=200)
    monkeypatch.setattr(scoring, "_CHUNK", 100)  # 2 resamples per chunk
    assert bootstrap_ci(values, n_resamples=200) == whole


# --- score_examples -----------------------------------------------------------------------------


def test_score_examples_per_example_and_summary(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["a"]}))
    outputs = ['{"a": 1}', '{"b": 2}', "```json\n{\"a\": 1}\n```", "no"]
    refs = [{"a": 1}, {"a": 2}, {"a": 1}, {"a": 1}]
    per, summary = score_examples(["json_valid", "json_valid_lenient", "schema_valid", "field_f1"], outputs, refs,
                                  schema=schema)
    assert [r["json_valid"] for r in per] == [1.0, 1.0, 0.0, 0.0]
    assert [r["json_valid_lenient"] for r in per] == [1.0, 1.0, 1.0, 0.0]
    assert [r["schema_valid"] for r in per] == [1.0, 0.0, 0.0, 0.0]
    assert [r["field_f1"] for r in per] == [1.0, 0.0, 0.0, 0.0]
    assert summary["json_valid"]["score"] == 0.5 and summary["json_valid"]["n"] == 4
    lo, hi = summary["json_valid_lenient"]["ci95"]
    assert 0 <= lo <= 0.75 <= hi <= 1


def test_score_examples_options_and_corpus():
    per, summary = score_examples(["exact_match"], ["Hello, world!"], ["hello world"],
                                  options={"exact_match": {"punctuation": True}})
    assert per == [{"exact_match": 1.0}]
    _, summary = score_examples(["bleu", "chrf"], ["a b c d", "e f g h"], ["a b c d", "e f g x"])
    assert summary["bleu"]["corpus"] != summary["bleu"]["score"]  # pooled counts vs mean of sentences
    assert 0 < summary["chrf"]["corpus"] < 1


def test_score_examples_checks_inputs():
    with pytest.raises(TunelabError, match="2 outputs but 1 references"):
        score_examples(["exact_match"], ["a", "b"], ["a"])
    with pytest.raises(TunelabError, match="no examples"):
        score_examples(["exact_match"], [], [])
    with pytest.raises(TunelabError, match="example 1: reference is not JSON"):
        score_examples(["json_exact"], ["{}", "{}"], ["{}", "{oops"])


# --- score_files --------------------------------------------------------------------------------


@pytest.fixture()
def files(tmp_path):
    preds = _jsonl(tmp_path / "preds.jsonl", [
        {"id": "c", "output": "Paris"}, {"id": "a", "output": "rome"}, {"id": "b", "output": "Oslo"}])
    refs = _jsonl(tmp_path / "refs.jsonl", [
        {"id": "a", "reference": "Rome"}, {"id": "b", "reference": "Bergen"}, {"id": "c", "reference": "paris"}])
    return preds, refs


def test_score_files_pairs_by_id(files):
    result = score_files("exact_match", *files)
    assert result["metric"] == "exact_match" and result["n"] == 3
    assert result["score"] == pytest.approx(2 / 3)  # by line it would be 0/3
    lo, hi = result["ci95"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1


def test_score_files_pairs_by_line(tmp_path):
    preds = _jsonl(tmp_path / "p.jsonl", [{"output": "a"}, {"output": "x"}])
    refs = _jsonl(tmp_path / "r.jsonl", [{"id": 1, "reference": "a"}, {"id": 2, "reference": "b"}])
    assert score_files("exact_match", preds, refs)["score"] == 0.5


def test_score_files_sql_with_db(tmp_path):
    db = tmp_path / "t.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2), (2);")
    conn.close()
    preds = _jsonl(tmp_path / "p.jsonl", [{"output": "SELECT x FROM t"}, {"output": "SELECT DISTINCT x FROM t"},
                                          {"output": "SELEC x"}, {"output": "SELECT x FROM t ORDER BY x DESC"}])
    refs = _jsonl(tmp_path / "r.jsonl", [{"reference": "SELECT x FROM t"}] * 3
                  + [{"reference": "SELECT x FROM t ORDER BY x"}])
    assert score_files("sql_exec", preds, refs, db=db)["score"] == 0.25


@pytest.mark.parametrize("case,match", [
    ("length", "has 2 rows but .* has 3"),
    ("ids", "1 reference ids have no prediction .*e.g. c.*1 prediction ids are not in .*e.g. z"),
    ("duplicate", "duplicate ids: a"),
    ("no_output", r"p.jsonl:2: the row has no 'output' field"),
    ("output_type", r"p.jsonl:1: 'output' must be a string"),
    ("no_reference", r"r.jsonl:1: the row has no 'reference' field"),
    ("malformed", r"r.jsonl:3: malformed JSON"),
    ("bad_json_reference", r"r.jsonl:2: reference is not JSON"),
    ("bad_pattern", r"r.jsonl:1: .*regex"),
    ("unknown_metric", "Unknown metric 'acc'. Valid metrics: exact_match, contains"),
    ("needs_schema", "needs --schema"),
    ("needs_db", "needs --db"),
    ("bad_schema", "not a valid JSON Schema .*nonsense"),
    ("schema_not_json", "not valid JSON"),
    ("missing_db", "does not exist"),
    ("not_sqlite", "not a readable SQLite database"),
    ("missing_file", "does not exist"),
])
def test_score_files_errors(tmp_path, case, match):
    p, r = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    ok_preds = [{"output": "a"}, {"output": "b"}, {"output": "c"}]
    ok_refs = [{"reference": "a"}, {"reference": "b"}, {"reference": "c"}]
    _jsonl(p, ok_preds)
    _jsonl(r, ok_refs)
    metric, kwargs = "exact_match", {}
    if case == "length":
        _jsonl(p, ok_preds[:2])
    elif case == "ids":
        _jsonl(p, [{"id": "a", "output": "x"}, {"id": "b", "output": "x"}, {"id": "z", "output": "x"}])
        _jsonl(r, [{"id": "a", "reference": "x"}, {"id": "b", "reference": "x"}, {"id": "c", "reference": "x"}])
    elif case == "duplicate":
        _jsonl(p, [{"id": "a", "output": "x"}, {"id": "a", "output": "x"}])
        _jsonl(r, [{"id": "a", "reference": "x"}, {"id": "b", "reference": "x"}])
    elif case == "no_output":
        _jsonl(p, [{"output": "a"}, {"text": "b"}, {"output": "c"}])
    elif case == "output_type":
        _jsonl(p, [{"output": 1}])
    elif case == "no_reference":
        _jsonl(r, [{"answer": "a"}])
    elif case == "malformed":
        _jsonl(r, [{"reference": "a"}, {"reference": "b"}, '{"reference": "c"'])
    elif case == "bad_json_reference":
        metric = "json_exact"
        _jsonl(r, [{"reference": "{}"}, {"reference": "{not json"}, {"reference": {"a": 1}}])
    elif case == "bad_pattern":
        metric = "regex"
        _jsonl(r, [{"reference": "(unclosed"}, {"reference": "b"}, {"reference": "c"}])
    elif case == "unknown_metric":
        metric = "acc"
    elif case == "needs_schema":
        metric = "schema_valid"
    elif case == "needs_db":
        metric = "sql_exec"
    elif case == "bad_schema":
        metric, kwargs = "schema_valid", {"schema": tmp_path / "s.json"}
        (tmp_path / "s.json").write_text(json.dumps({"type": "nonsense"}))
    elif case == "schema_not_json":
        metric, kwargs = "schema_valid", {"schema": tmp_path / "s.json"}
        (tmp_path / "s.json").write_text("{type: object}")
    elif case == "missing_db":
        metric, kwargs = "sql_exec", {"db": tmp_path / "nope.sqlite"}
    elif case == "not_sqlite":
        metric, kwargs = "sql_exec", {"db": tmp_path / "fake.sqlite"}
        (tmp_path / "fake.sqlite").write_text("this is not a database, just text " * 10)
    elif case == "missing_file":
        p = tmp_path / "absent.jsonl"
    with pytest.raises(TunelabError, match=match):
        score_files(metric, p, r, **kwargs)


def test_score_files_reports_errors_before_scoring(tmp_path, monkeypatch):
    p = _jsonl(tmp_path / "p.jsonl", [{"output": "a"}, {"output": "b"}])
    r = _jsonl(tmp_path / "r.jsonl", [{"reference": "a"}, "not json"])
    calls = []
    monkeypatch.setattr(scoring, "score_examples", lambda *a, **k: calls.append(a))
    with pytest.raises(TunelabError, match="r.jsonl:2"):
        score_files("exact_match", p, r)
    assert calls == []


# --- failure classes ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,output,scores,kwargs,expected", [
    ("json", '{"a": 1}', {"json_exact": 1.0}, {}, None),
    ("json", "{'a': 1}", {"json_exact": 0.0}, {}, "format"),  # json_valid computed here when absent
    ("json", '{"a": 2}', {"json_exact": 0.0}, {}, "content"),
    ("json", '{"a": 2}', {"json_exact": 0.0, "json_valid": 1.0, "schema_valid": 0.0}, {}, "format"),
    ("json", "I'm sorry, I can't do that.", {"json_exact": 0.0}, {}, "refusal"),
    ("json", "I'm sorry, I can't do that.", {"json_exact": 0.0}, {"refusal": False}, "format"),
    ("json", '{"a": 2}', {"json_exact": 0.0, "refusal": 1.0}, {}, "refusal"),
    ("sql", "SELEC x", {"sql_exec": 0.0, "sql_valid": 0.0}, {}, "format"),
    ("sql", "SELECT y FROM t", {"sql_exec": 0.0, "sql_valid": 1.0}, {}, "content"),
    ("sql", "The answer is x", {"sql_exec": 0.0}, {}, "format"),  # no sql_valid score: doesn't look like a query
    ("sql", "WITH a AS (SELECT 1) SELECT * FROM a", {"sql_exec": 0.0}, {}, "content"),
    ("facts", "Lyon", {"contains": 0.0}, {"corpus_hit": True}, "knowledge"),
    ("facts", "Lyon", {"contains": 0.0}, {"corpus_hit": False}, "content"),
    ("facts", "Paris", {"contains": 1.0}, {"corpus_hit": True}, None),
    ("facts", "I cannot answer that.", {"contains": 0.0}, {"corpus_hit": True}, "refusal"),
    ("text", "close", {"rouge_l": 0.6}, {}, None),  # overlap metrics pass at 0.5
    ("text", "close", {"rouge_l": 0.6}, {"threshold": 0.8}, "content"),
])
def test_classify(kind, output, scores, kwargs, expected):
    primary = next(iter(scores))
    assert classify(kind, output, "ref", scores, primary, **kwargs) == expected


def test_classify_needs_primary_score():
    with pytest.raises(KeyError, match="primary"):
        classify("json", "{}", {}, {"json_valid": 1.0}, "json_exact")


def test_count_classes():
    rows = [{"failure": "format"}, {"failure": None}, {"failure": "format"}, {"failure": "refusal"}, "knowledge", None]
    assert count_classes(rows) == {"format": 2, "content": 0, "knowledge": 1, "refusal": 1}
    assert list(count_classes([])) == list(CLASSES)
    with pytest.raises(ValueError, match="unknown failure class"):
        count_classes([{"failure": "typo"}])
