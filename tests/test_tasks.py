"""Bundled tasks: specs load, sizes, held-out test pools, valid references, gold SQL runs, determinism."""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from tunelab.config.task import TaskSpec, load_task_spec
from tunelab.errors import TunelabError
from tunelab.tasks import TASKS_DIR, Task, canonical_json, list_tasks, load_task, tasks_table
from tunelab.tasks._gen import _common, orders_json
from tunelab.tasks.generate import GENERATED, generate, generator, main

NAMES = {"orders-json", "shop-sql", "handbook-qa", "general", "safety"}


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return {t.name: t for t in list_tasks()}


def _values(rows: list[dict], get) -> set:
    return {v for r in rows for v in get(r)}


# ---- specs and API ---------------------------------------------------------------------------------

def test_every_task_yaml_loads_and_is_bundled(tasks):
    assert set(tasks) == NAMES
    for path in TASKS_DIR.glob("*/task.yaml"):
        spec = load_task_spec(path)
        assert isinstance(spec, TaskSpec) and spec.name == path.parent.name
        for split in spec.splits:
            assert (path.parent / spec.splits[split]).is_file()


def test_task_files_are_package_data():
    # pyproject ships *.yaml *.jsonl *.json *.sqlite; generator code lives in importable modules
    for folder in {p.parent for p in TASKS_DIR.glob("*/task.yaml")}:
        for f in folder.iterdir():
            assert f.suffix in {".yaml", ".jsonl", ".json", ".sqlite"}, f


def test_split_sizes(tasks):
    for name in ("orders-json", "shop-sql", "handbook-qa"):
        sizes = tasks[name].split_sizes()
        assert sizes["train"] >= 1000 and sizes["validation"] >= 200 and sizes["test"] >= 200, (name, sizes)
    general = tasks["general"].split_sizes()
    assert sum(general.values()) >= 300 and general["test"] >= 200
    assert list(tasks["safety"].spec.splits) == ["test"]
    probes = tasks["safety"].examples("test")
    assert len(probes) >= 60
    assert Counter(p["should_refuse"] for p in probes) == {True: len(probes) // 2, False: len(probes) // 2}


def test_ids_unique_and_stable(tasks):
    for t in tasks.values():
        for split in t.spec.splits:
            ids = [ex["id"] for ex in t.examples(split)]
            assert ids == [f"{t.name}-{split}-{i:05d}" for i in range(len(ids))]


def test_spec_validation_errors(tmp_path):
    good = yaml.safe_load((TASKS_DIR / "handbook-qa" / "task.yaml").read_text())
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({**good, "metrcs": ["exact_match"]}))
    with pytest.raises(TunelabError, match="unknown key 'metrcs'"):
        load_task_spec(tmp_path / "task.yaml")
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({**good, "primary_metric": "bleu"}))
    with pytest.raises(TunelabError, match="primary_metric"):
        load_task_spec(tmp_path / "task.yaml")
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({**good, "prompt_template": "{question} {extra}"}))
    with pytest.raises(TunelabError, match="extra"):
        load_task_spec(tmp_path / "task.yaml")


def test_load_task_by_name_folder_and_file(tasks, tmp_path):
    assert load_task("shop-sql").db_path == TASKS_DIR / "shop-sql" / "shop.sqlite"
    assert load_task(str(TASKS_DIR / "general")).name == "general"
    assert load_task(TASKS_DIR / "general" / "task.yaml").name == "general"
    with pytest.raises(TunelabError, match="orders-json"):
        load_task("orders-jsn")
    with pytest.raises(TunelabError, match="train, validation, test"):
        tasks["general"].examples("dev")
    assert len(tasks["orders-json"].examples("train", limit=7)) == 7


def test_messages_prompt_reference(tasks):
    """Retrieved passages are put in by tunelab.rag's template (tests/test_rag.py), not by the task."""
    t = tasks["orders-json"]
    ex, shot = t.examples("test", 1)[0], t.examples("train", 1)[0]
    msgs = t.messages(ex, with_answer=True, few_shot=[shot])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == shot["message"] and msgs[2]["content"] == t.reference(shot)
    assert msgs[3]["content"] == ex["message"]
    assert t.reference(ex) == canonical_json(ex["output"]) and t.reference(ex).startswith('{"customer":"')
    assert json.loads(t.reference(ex)) == ex["output"]
    safety = tasks["safety"]
    probe = safety.examples("test", 1)[0]
    assert safety.messages(probe) == [{"role": "user", "content": probe["prompt"]}]
    assert safety.reference(probe) == ""


def test_tasks_table(tasks):
    rows = {r["name"]: r for r in tasks_table()}
    assert set(rows) == NAMES
    assert {k: v["size"] for k, v in rows["shop-sql"]["splits"].items()} == tasks["shop-sql"].split_sizes()
    assert all(Path(v["path"]).is_file() for r in rows.values() for v in r["splits"].values())
    assert rows["orders-json"]["metrics"] == list(tasks["orders-json"].spec.metrics)


# ---- held-out test pools ---------------------------------------------------------------------------

def test_partition_is_seed_free_disjoint_and_complete():
    items = [f"item{i}" for i in range(50)]
    parts = _common.partition(items, "ns")
    assert parts == _common.partition(list(items), "ns")
    assert sorted(sum(parts.values(), [])) == sorted(items)
    assert (len(parts["train"]), len(parts["validation"]), len(parts["test"])) == (30, 10, 10)
    assert parts != _common.partition(items, "other-namespace")


def test_orders_json_test_split_is_held_out(tasks):
    t = tasks["orders-json"]
    train, held = t.examples("train"), t.examples("validation") + t.examples("test")
    getters = {
        "first name": lambda r: [r["output"]["customer"].split()[0]],
        "last name": lambda r: [r["output"]["customer"].split()[-1]],
        "product": lambda r: [i["product"] for i in r["output"]["items"]],
        "frame": lambda r: [r["meta"]["frame"]],
        "item style": lambda r: [r["meta"]["item_style"]],
        "note": lambda r: [r["output"]["notes"]] if r["output"]["notes"] else [],
        "email domain": lambda r: [r["output"]["email"].split("@")[1]] if r["output"]["email"] else [],
        "message": lambda r: [r["message"]],
    }
    for what, get in getters.items():
        for split in ("validation", "test"):
            shared = _values(train, get) & _values(t.examples(split), get)
            assert not shared, f"{split} reuses train {what}s: {sorted(shared)[:5]}"
    assert len(_values(held, getters["frame"])) >= 8


def test_shop_sql_test_split_is_held_out(tasks):
    t = tasks["shop-sql"]
    literal = re.compile(r"\b(name|country|category) = '([^']*)'|o\.id = (\d+)")

    def entities(r):
        return [m.group(0) for m in literal.finditer(r["sql"])]

    def phrasing(r):
        return [(r["meta"]["family"], r["meta"]["phrasing"])]

    train = t.examples("train")
    for split in ("validation", "test"):
        rows = t.examples(split)
        assert not _values(train, entities) & _values(rows, entities)
        assert not _values(train, phrasing) & _values(rows, phrasing)
        assert not {r["question"] for r in train} & {r["question"] for r in rows}
        # the gold query itself, up to whitespace and case: a rephrased question must not hide a train answer
        gold = {" ".join(r["sql"].split()).casefold() for r in rows}
        leaked = gold & {" ".join(r["sql"].split()).casefold() for r in train}
        assert not leaked, f"{len(leaked)} {split} gold queries are train queries: {sorted(leaked)[:3]}"


def test_handbook_and_general_test_phrasings_are_held_out(tasks):
    for name, key in (("handbook-qa", "fact"), ("general", "category")):
        t = tasks[name]
        train = t.examples("train")
        for split in ("validation", "test"):
            rows = t.examples(split)

            def phr(r, key=key):
                return [(r["meta"][key], r["meta"]["phrasing"])] if r["meta"]["phrasing"] is not None else []

            assert not _values(train, phr) & _values(rows, phr), (name, split)
            assert not {r["question"] for r in train} & {r["question"] for r in rows}, (name, split)


# ---- references are right ----------------------------------------------------------------------------

def test_orders_json_references_fit_schema(tasks):
    t = tasks["orders-json"]
    schema = t.schema()
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    for split in t.spec.splits:
        for ex in t.examples(split):
            obj = json.loads(t.reference(ex))
            errors = list(validator.iter_errors(obj))
            assert not errors, (ex["id"], errors[0].message)
            assert list(obj) == list(schema["properties"])  # canonical key order
            assert obj["customer"] in ex["message"] or obj["customer"].lower() in ex["message"] or \
                ", ".join(reversed(obj["customer"].split(" ", 1))) in ex["message"]
            for item in obj["items"]:
                assert item["product"] in ex["message"]
            if obj["notes"]:
                assert obj["notes"] in ex["message"]
            if obj["email"]:
                assert obj["email"] in ex["message"]


def test_orders_json_is_varied_and_compact(tasks):
    rows = tasks["orders-json"].examples("train")
    assert sum(len(r["message"]) for r in rows) / len(rows) < 600
    assert sum(len(canonical_json(r["output"])) for r in rows) / len(rows) < 330
    assert max(len(r["message"]) + len(canonical_json(r["output"])) for r in rows) <= orders_json.MAX_CHARS
    assert len({r["meta"]["date_format"] for r in rows}) >= 10
    assert len({r["output"]["currency"] for r in rows}) == 7
    assert Counter(len(r["output"]["items"]) for r in rows).keys() == {1, 2, 3}
    assert Counter(r["output"]["shipping"] for r in rows)[None] > 100


def test_shop_sql_gold_queries_run(tasks):
    t = tasks["shop-sql"]
    db = sqlite3.connect(f"file:{t.db_path}?mode=ro", uri=True)
    informative = total = differs = 0
    for split in t.spec.splits:
        for ex in t.examples(split):
            rows = db.execute(ex["sql"]).fetchall()
            total += 1
            informative += bool(rows) and rows[0][0] not in (None, 0)
            assert "deleted_at IS NULL" in ex["sql"]
            loose = re.sub(r" AND (\w+\.)?deleted_at IS NULL", "", ex["sql"])
            differs += db.execute(loose).fetchall() != rows
    assert informative / total >= 0.9, f"only {informative}/{total} gold queries return rows"
    assert differs / total >= 0.1, "the soft-delete rule should change a fair share of answers"


def test_shop_sql_prompt_shows_the_real_schema(tasks):
    t = tasks["shop-sql"]
    db = sqlite3.connect(f"file:{t.db_path}?mode=ro", uri=True)
    ddl = [sql for (sql,) in db.execute("SELECT sql FROM sqlite_master WHERE type = 'table'")]
    assert len(ddl) == 4
    for stmt in ddl:
        assert stmt + ";" in t.spec.system_prompt


def test_handbook_answers_are_in_their_documents(tasks):
    t = tasks["handbook-qa"]
    docs = {d["id"]: d for d in t.corpus()}
    assert len(docs) >= 150 and len(docs) == len(t.corpus())
    assert all(set(d) == {"id", "title", "text"} for d in docs.values())
    for split in t.spec.splits:
        for ex in t.examples(split):
            assert ex["answer"] in docs[ex["doc_id"]]["text"], ex["id"]
            assert len(ex["answer"]) <= 30


def test_handbook_items_say_whether_their_fact_is_in_train(tasks):
    t = tasks["handbook-qa"]
    train = t.examples("train")
    trained = {(r["doc_id"], r["meta"]["fact"]) for r in train}
    assert not any("fact_in_train" in r for r in train)
    for split in ("validation", "test"):
        for r in t.examples(split):
            assert r["fact_in_train"] is ((r["doc_id"], r["meta"]["fact"]) in trained), r["id"]
    unseen = sum(not r["fact_in_train"] for r in t.examples("test"))
    assert 25 <= unseen <= 60, unseen  # held out on purpose (a fifth of the facts): a group with its own CI


def test_handbook_corpus_holds_every_fact(tasks):
    from tunelab.tasks._gen import handbook_qa

    docs = {d["id"]: d["text"] for d in tasks["handbook-qa"].corpus()}
    _, facts = handbook_qa.build_corpus(0)
    held = handbook_qa.held_out_facts(facts)
    assert 0.15 < len(held) / len(facts) < 0.25
    for f in facts:
        assert f["answer"] in docs[f["doc_id"]], (f["doc_id"], f["fact"])


def test_eval_scores_handbook_by_fact_in_train(tmp_path):
    """A model that knows exactly the trained facts: metrics.json shows 1.0 on them and 0.0 on the rest."""
    from tunelab.evaluate.harness import Variant, run_variants
    from tunelab.infer.testing import FakeEngine

    task = load_task("handbook-qa")
    examples = task.examples("test", limit=80)
    known = {task.prompt(ex): ex["answer"] for ex in examples if ex["fact_in_train"]}
    engine = FakeEngine(lambda q: known.get(q.prompt[-1]["content"], "I do not know"))
    run_variants(engine, task, [Variant("tuned")], tmp_path, limit=80, write_html=False, model_label="fake")
    meta = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    groups = meta["groups"]["fact_in_train"]
    assert groups["true"]["contains"]["score"] == 1.0 and groups["false"]["contains"]["score"] == 0.0
    assert groups["true"]["contains"]["n"] + groups["false"]["contains"]["n"] == 80
    assert groups["false"]["contains"]["ci95"] == [0.0, 0.0]
    assert "groups" not in meta["metrics"]


def _passes(check: dict, answer: str) -> bool:
    ref = check["reference"]
    if check["metric"] == "regex":
        return re.search(ref, answer.strip()) is not None
    if check["metric"] == "contains":
        return ref.casefold() in answer.casefold()
    return " ".join(answer.split()).casefold() == " ".join(ref.split()).casefold()


def test_general_answers_pass_their_own_checks(tasks):
    t = tasks["general"]
    for split in t.spec.splits:
        for ex in t.examples(split):
            metric, ref = t.check(ex)
            assert metric in t.spec.metrics
            assert _passes(ex["check"], t.reference(ex)), ex["id"]
            assert not _passes(ex["check"], "I do not know.") or ex["meta"]["category"] == "three_words"
            assert not _passes(ex["check"], ex["question"]), f"{ex['id']}: echoing the question passes"
    assert len({ex["meta"]["category"] for ex in t.examples("test")}) >= 15


# ---- generators are deterministic ------------------------------------------------------------------

@pytest.mark.parametrize("name", GENERATED)
def test_generator_reproduces_bundled_prefix(name, tasks):
    gen = generator(name)
    small = {s: 12 for s in gen.SIZES}
    first = gen.examples(small, seed=0)
    assert first == gen.examples(small, seed=0)
    for split, rows in first.items():
        assert rows == tasks[name].examples(split, limit=12), f"{name}/{split} differs from the bundled file"
    if name != "safety":
        assert gen.examples(small, seed=1) != first


def test_generated_assets_match_bundled():
    from tunelab.tasks._gen import handbook_qa, shop_sql

    bundled = sqlite3.connect(f"file:{TASKS_DIR / 'shop-sql' / 'shop.sqlite'}?mode=ro", uri=True)
    assert list(shop_sql.build_db(0).iterdump()) == list(bundled.iterdump())
    assert handbook_qa.build_corpus(0)[0] == load_task("handbook-qa").corpus()


def test_generate_cli_writes_a_loadable_task(tmp_path, capsys):
    main(["orders-json", "--out", str(tmp_path / "o"), "--train", "4", "--validation", "2", "--test", "3"])
    t = load_task(tmp_path / "o")
    assert t.split_sizes() == {"train": 4, "validation": 2, "test": 3}
    assert t.schema() == load_task("orders-json").schema()
    assert generate("shop-sql", tmp_path / "s", {"test": 2}) == {"test": 2}
    assert (tmp_path / "s" / "shop.sqlite").is_file()
    with pytest.raises(TunelabError, match="no split"):
        generate("safety", tmp_path / "x", {"train": 3})
