"""tunelab.runs: folder formats, the SQLite registry (creation, migration, bad files, two writers), lineage."""

import json
import multiprocessing as mp
import sqlite3
import time

import pytest
import yaml

from tunelab.errors import TunelabError
from tunelab.runs import (
    SCHEMA_VERSION,
    compare,
    connect,
    depends_on,
    layout,
    lineage,
    list_artifacts,
    record_eval,
    record_training_run,
    register_folder,
    register_training_run,
    roots,
    show,
)
from tunelab.runs.layout import file_sha256


@pytest.fixture()
def db(tmp_path, monkeypatch):
    path = tmp_path / "reg" / "registry.sqlite"
    monkeypatch.setenv("TUNELAB_REGISTRY", str(path))
    return path


# --- formats -------------------------------------------------------------------------------------------------
def test_eval_folder_round_trip_and_atomic_files(tmp_path):
    meta = {"task": "t", "metrics": {"json_exact": {"score": 0.5, "ci95": [0.1, 0.9], "n": 2}}}
    rows = [{"id": 1, "output": "ünïcode ✓"}, {"id": 2, "output": "{\"a\": 1}"}]
    layout.write_eval_folder(tmp_path / "ev" / "base", meta, rows)
    layout.write_eval_folder(tmp_path / "ev" / "base", meta, rows[:1])  # overwrite replaces the folder
    got_meta, got_rows = layout.read_eval_folder(tmp_path / "ev" / "base")
    assert got_meta == meta and got_rows == rows[:1]
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["base"]  # no temp folder left behind
    assert layout.find_eval_folders(tmp_path / "ev") == [tmp_path / "ev" / "base"]
    assert layout.folder_kind(tmp_path / "ev" / "base") == "eval"
    layout.write_run_json(tmp_path / "run", {"base_model": {"spec": "m"}, "metrics": {"steps": 2}})
    assert layout.read_run_json(tmp_path / "run")["metrics"] == {"steps": 2}
    assert [p.name for p in (tmp_path / "run").iterdir()] == [layout.RUN_JSON]
    assert layout.folder_kind(tmp_path / "run") == "run"


def test_bad_files_raise_errors_naming_them(tmp_path):
    (tmp_path / layout.EVAL_METRICS).write_text("{not json")
    with pytest.raises(TunelabError, match="metrics.json is not valid JSON"):
        layout.read_eval_metrics(tmp_path)
    with pytest.raises(TunelabError, match="has no metrics.json"):
        layout.read_eval_metrics(tmp_path / "nothing")
    (tmp_path / "p.jsonl").write_text('{"a": 1}\n{"b"\n')
    with pytest.raises(TunelabError, match="p.jsonl:2: malformed JSON"):
        layout.read_jsonl(tmp_path / "p.jsonl")
    assert layout.read_jsonl(tmp_path / "p.jsonl", skip_bad=True) == [{"a": 1}]


def test_one_jsonl_reader_for_artifacts_and_data(tmp_path):
    """runs.layout.read_jsonl is the data reader too (tunelab.data re-exports it): a raw U+2028 inside a string is
    not a line break, a byte-order mark is skipped, a non-object line and a non-UTF-8 byte name file:line."""
    import tunelab.data

    assert tunelab.data.read_jsonl is layout.read_jsonl
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "a\u2028b"}\n\n{"step": 2}\n'.encode())
    assert layout.read_jsonl(path) == [{"text": "a\u2028b"}, {"step": 2}]
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(TunelabError, match="p.jsonl:2: expected a JSON object"):
        layout.read_jsonl(path)
    assert layout.read_jsonl(path, skip_bad=True) == [{"a": 1}]
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(TunelabError, match="p.jsonl:2: the file is not UTF-8"):
        layout.read_jsonl(path)


def test_training_log_name_and_legacy_runs(tmp_path):
    assert layout.TRAIN_LOG != layout.EVAL_METRICS and not layout.TRAIN_LOG.startswith("metrics")
    old = tmp_path / "old"
    old.mkdir()
    (old / layout.LEGACY_TRAIN_LOG).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # torn last line
    assert layout.read_train_log(old) == [{"step": 1, "loss": 2.0}]
    path = layout.open_train_log(old)  # resuming an old run moves its log to the new name
    assert path == old / layout.TRAIN_LOG and path.is_file() and not (old / layout.LEGACY_TRAIN_LOG).exists()
    layout.append_jsonl(path, {"step": 3, "loss": 1.0})
    layout.append_jsonl(path, {"step": 4, "loss": 0.5})
    assert path.read_text().splitlines()[1:] == ['{"step": 2, "lo', '{"step": 3, "loss": 1.0}', '{"step": 4, "loss": 0.5}']
    assert layout.read_train_log(old)[-2:] == [{"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.5}]


# --- a small graph: two runs on one base, evals, a merge and an export ------------------------------------
def _run_folder(root, name, base_hash, data_text, lr=1e-4):
    folder = root / name
    folder.mkdir(parents=True)
    data = root / f"{name}.jsonl"
    data.write_text(data_text)
    recipe = {"method": "lora", "train": {"lr": lr}, "output_dir": str(folder)}
    (folder / layout.RECIPE_YAML).write_text(yaml.safe_dump(recipe))
    (folder / layout.ADAPTER_WEIGHTS).write_bytes(name.encode() * 10)
    (folder / layout.ADAPTER_CONFIG).write_text("{}")
    layout.write_run_json(folder, {
        "base_model": {"spec": "tiny-base", "kind": "hf_dir", "path": str(root / "base"), "hash": base_hash},
        "method": "lora", "data": {"train": {"path": str(data), "sha256": file_sha256(data)}},
        "system_prompt": "Answer in JSON.", "metrics": {"steps": 2}, "recipe": recipe})
    return folder


def _eval_folder(root, name, adapter, score, data):
    folder = root / "evals" / name
    layout.write_eval_folder(folder, {
        "task": "orders-json", "split": "test", "model": name, "base_model": "tiny-base",
        "adapter": str(adapter) if adapter else None, "n": 2, "primary_metric": "json_exact",
        "metrics": {"json_exact": {"score": score}, "field_f1": {"score": score / 2}}, "failures": {"format": 1},
        "provenance": {"base_model": {"spec": "tiny-base", "hash": "basehash1"},
                       "data": {"path": str(data), "sha256": file_sha256(data)}}}, [])
    return folder


@pytest.fixture()
def graph(tmp_path, db):
    a = _run_folder(tmp_path, "run-a", "basehash1", '{"x": 1}\n{"x": 2}\n')
    b = _run_folder(tmp_path, "run-b", "basehash1", '{"x": 3}\n', lr=3e-4)
    other = _run_folder(tmp_path, "run-other", "otherbase", '{"x": 1}\n{"x": 2}\n')  # same data as a
    ids = {n: record_training_run(f) for n, f in (("a", a), ("b", b), ("other", other))}
    test = tmp_path / "test.jsonl"
    test.write_text('{"q": 1}\n{"q": 2}\n')
    ids["eval_base"] = record_eval(_eval_folder(tmp_path, "base", None, 0.2, test))
    ids["eval_a"] = record_eval(_eval_folder(tmp_path, "a", a, 0.6, test), "Answer in JSON.", [{"id": 7}])
    merge = tmp_path / "merged"
    merge.mkdir()
    ids["merge"] = register_folder("merge", merge, {"adapter_a": a, "adapter_b": ids["b"]})
    ids["export"] = register_folder("export", tmp_path / "gguf", {"model": ids["merge"]})
    return tmp_path, ids


def test_lineage_walks_back_to_base_data_recipe_and_prompt(graph):
    root, ids = graph
    tree = lineage(str(root / "run-a"))  # the adapter row of the folder (the run row shares its path)
    assert tree["kind"] == "adapter" and tree["id"] == ids["a"]
    ends = roots(tree)
    assert [b["hash"] for b in ends["base_model"]] == ["basehash1"]
    assert ends["dataset"][0]["hash"] == file_sha256(root / "run-a.jsonl") and ends["dataset"][0]["role"] == "train"
    assert len(ends["recipe"]) == 1 and ends["prompt"][0]["role"] == "system_prompt"
    export = lineage(ids["export"])  # export -> merge -> two adapters -> runs -> one base
    assert {b["hash"] for b in roots(export)["base_model"]} == {"basehash1"}
    assert len(roots(export)["recipe"]) == 2  # the two runs differ in lr
    ev = roots(lineage(ids["eval_a"]))
    assert {p["role"] for p in ev["prompt"]} == {"system_prompt", "few_shot"}
    assert {d["role"] for d in ev["dataset"]} == {"dataset", "train"}


def test_depends_on_lists_everything_built_on_a_base(graph):
    root, ids = graph
    got = depends_on("basehash1")
    assert {(r["kind"], r["id"]) for r in got["artifacts"]} == {
        ("adapter", ids["a"]), ("adapter", ids["b"]), ("merge", ids["merge"]), ("export", ids["export"])}
    by_name = {r["id"] for r in depends_on("tiny-base")["artifacts"]}  # a spec may name several hashes
    assert by_name == {ids["a"], ids["b"], ids["other"], ids["merge"], ids["export"]}
    everything = {r["kind"] for r in depends_on("basehash1", all_kinds=True)["artifacts"]}
    assert everything == {"run", "adapter", "merge", "export", "eval"}
    assert [r["id"] for r in depends_on("otherbase")["artifacts"]] == [ids["other"]]
    with pytest.raises(TunelabError, match="no base model 'nope'"):
        depends_on("nope")


def test_list_show_compare(graph):
    root, ids = graph
    evals = list_artifacts("eval")
    assert [e["id"] for e in evals] == [ids["eval_a"], ids["eval_base"]]
    assert evals[0]["primary_score"] == 0.6 and evals[0]["task"] == "orders-json"
    datasets = list_artifacts("dataset")
    assert len(datasets) == 3  # run-a and run-other share one file content: one row
    d = show(ids["a"])
    assert [p["role"] for p in d["made_from"]] == ["run"] and {u["kind"] for u in d["used_by"]} == {"eval", "merge"}
    c = compare([str(root / "evals" / "base"), str(ids["eval_a"])])
    assert c["metrics"]["json_exact"] == [0.2, 0.6] and c["metrics"]["field_f1"] == [0.1, 0.3]
    assert c["failures"] == {"format": [1, 1]}
    with pytest.raises(TunelabError, match="no eval"):
        compare([str(ids["a"])])
    with pytest.raises(TunelabError, match="unknown kind"):
        list_artifacts("adaptor")


def test_views_show_typed_columns(graph, db):
    conn = connect(db)
    rows = {r["sha256"]: r["rows"] for r in conn.execute("SELECT * FROM datasets")}
    assert sorted(rows.values()) == [1, 2, 2]
    assert conn.execute("SELECT spec FROM base_models WHERE hash = 'basehash1'").fetchone()[0] == "tiny-base"
    assert conn.execute("SELECT primary_score FROM evals ORDER BY primary_score").fetchall()[1][0] == 0.6
    conn.close()


# --- registry file: created, migrated, refused -------------------------------------------------------------
def test_missing_registry_is_created_in_wal(db):
    assert not db.exists()
    conn = connect()
    assert db.is_file() and conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_v1_registry_is_migrated_keeping_its_rows(db):
    db.parent.mkdir(parents=True)
    old = sqlite3.connect(db)  # the v1 layout, written by hand: no name/hash columns, no views
    old.executescript("""
        CREATE TABLE artifacts (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, key TEXT NOT NULL, path TEXT,
            meta TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL, UNIQUE (kind, key));
        CREATE TABLE edges (child INTEGER NOT NULL, parent INTEGER NOT NULL, role TEXT NOT NULL,
            PRIMARY KEY (child, parent, role));
        INSERT INTO artifacts VALUES (1, 'base_model', 'h1', '/m', '{"hash": "h1", "name": "old-base"}', '2025');
        INSERT INTO artifacts VALUES (2, 'adapter', '/runs/a', '/runs/a', '{}', '2025');
        INSERT INTO edges VALUES (2, 1, 'base_model');
        PRAGMA user_version = 1;
    """)
    old.close()
    conn = connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION > 1
    row = conn.execute("SELECT name, hash, path FROM artifacts WHERE id = 1").fetchone()
    assert tuple(row) == ("old-base", "h1", "/m")
    assert conn.execute("SELECT spec FROM base_models").fetchone()[0] == "old-base"
    conn.close()
    assert [r["id"] for r in depends_on("old-base")["artifacts"]] == [2]
    assert lineage("/runs/a")["parents"][0]["hash"] == "h1"


def test_future_or_corrupt_registry_is_a_clear_error_not_a_crash(db, tmp_path):
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(TunelabError, match=r"newer than this tunelab knows.*TUNELAB_REGISTRY"):
        connect(db)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(TunelabError, match="junk.sqlite is not a tunelab registry"):
        connect(junk)
    # train and eval only warn: the run folder is written, registration is skipped
    folder = _run_folder(tmp_path, "run-x", "h", "{}\n")
    assert register_training_run(folder) is None
    with pytest.raises(TunelabError, match="newer than"):
        register_training_run(folder, strict=True)


def test_a_tracker_failure_warns_and_keeps_the_registry_row(tmp_path, db, capsys, caplog):
    folder = _run_folder(tmp_path, "run-m", "h", "{}\n")
    recipe = yaml.safe_load((folder / layout.RECIPE_YAML).read_text())
    recipe.update(report_to=["mlflow"], mlflow_tracking_uri="notascheme://nowhere")
    (folder / layout.RECIPE_YAML).write_text(yaml.safe_dump(recipe))
    aid = register_training_run(folder)
    assert aid is not None and show(aid)["path"] == str(folder.resolve())
    assert "could not mirror" in capsys.readouterr().err + caplog.text  # printed, or logged (for the CLI to show)
    with pytest.raises(Exception):  # noqa: B017 - whatever mlflow raises, strict passes it on
        register_training_run(folder, strict=True)


# --- two processes -----------------------------------------------------------------------------------------
N_ROWS = 200


def _writer(db_path, tag, base_id, start_at):
    import os
    import time
    from pathlib import Path

    os.environ["TUNELAB_REGISTRY"] = db_path
    time.sleep(max(0.0, start_at - time.time()))  # both start writing at the same moment
    for i in range(N_ROWS):
        register_folder("export", Path(db_path).parent / f"{tag}-{i}", {"base_model": base_id}, {"i": i})


def test_two_processes_writing_at_once_lose_nothing(db):
    conn = connect()
    from tunelab.runs.registry import upsert, write_txn

    with write_txn(conn):
        base = upsert(conn, "base_model", "h", name="b", hash="h")
    conn.close()
    ctx = mp.get_context("spawn")
    start_at = time.time() + 3.0  # after both spawned interpreters have imported tunelab.runs
    procs = [ctx.Process(target=_writer, args=(str(db), tag, base, start_at)) for tag in ("p", "q")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    conn = connect()
    assert conn.execute("SELECT COUNT(*) FROM artifacts WHERE kind = 'export'").fetchone()[0] == 2 * N_ROWS
    assert conn.execute("SELECT COUNT(*) FROM edges WHERE parent = ?", (base,)).fetchone()[0] == 2 * N_ROWS
    metas = sorted(json.loads(r[0])["i"] for r in conn.execute("SELECT meta FROM artifacts WHERE kind = 'export'"))
    assert metas == sorted(list(range(N_ROWS)) * 2)
    conn.close()
    assert len(depends_on("h")["artifacts"]) == 2 * N_ROWS


def test_cli_errors_are_one_paragraph(db, tunelab, tmp_path):
    code, _, err = tunelab("runs", "lineage", tmp_path / "never-trained")
    assert code == 2 and "no artifact" in err and "tunelab runs list" in err and "Traceback" not in err
    code, _, err = tunelab("runs", "register", tmp_path)
    assert code == 2 and "neither a training run folder" in err
    code, out, _ = tunelab("runs", "list", "--json")
    assert code == 0 and json.loads(out) == []


# --- `tunelab runs list` and `runs lineage` from the command line ---------------------------------------------
HUB_CACHE = "/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/12345678"


@pytest.fixture()
def listed(graph):
    """The small graph plus a base model registered by its cache folder (a 78-character name)."""
    from tunelab.runs import register_base_model

    root, ids = graph
    ids["cache_base"] = register_base_model({"spec": HUB_CACHE, "path": HUB_CACHE, "hash": "c" * 64})
    return root, ids


def _terminal(monkeypatch, width):
    """Point the runs commands' console at a terminal `width` columns wide; returns its buffer."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr("tunelab.cli.runs.out", Console(file=buf, width=width, force_terminal=True,
                                                        color_system=None))
    return buf


def _columns(text: str) -> list[dict[str, str]]:
    """The rows of a table printed without borders, cut at the header's column starts."""
    import re

    head, *lines = text.splitlines()
    starts = [(m.group(), m.start()) for m in re.finditer(r"\S+", head)]
    ends = [s for _, s in starts[1:]] + [None]
    return [{name: line[s:e].strip() for (name, s), e in zip(starts, ends)} for line in [head, *lines]]


@pytest.mark.parametrize("width", [80, 100])
def test_runs_list_keeps_every_column_on_a_narrow_terminal(listed, tunelab, monkeypatch, width):
    root, ids = listed
    buf = _terminal(monkeypatch, width)
    code, _, err = tunelab("runs", "list")
    assert code == 0, err
    assert all(len(line) <= width for line in buf.getvalue().splitlines())
    head, *table = _columns(buf.getvalue())
    assert list(head) == ["id", "kind", "name", "hash", "score", "created", "path"]
    rows = {int(r["id"]): r for r in table}
    full = {r["id"]: r for r in list_artifacts()}
    assert set(rows) == set(full)
    for i, r in rows.items():  # no column squeezed to nothing: kinds whole, names, hashes and times shown
        assert r["kind"] == full[i]["kind"] and r["name"] and r["created"].endswith(full[i]["created_at"][11:16])
        assert r["hash"] == (full[i]["hash"] or "")[:8] and (r["path"] or not full[i]["path"])
    base = rows[ids["cache_base"]]
    assert base["name"].startswith("SmolLM") and base["name"].endswith("nstruct")  # the hub id's model
    assert base["name"] == "SmolLM2-135M-Instruct" or width == 80
    assert base["path"].endswith("12345678") and len(base["path"]) < len(HUB_CACHE)
    assert rows[ids["eval_a"]]["score"].startswith("0.600 json")


def test_runs_list_wide_and_piped_show_every_value(listed, tunelab, monkeypatch):
    from tunelab.cli import runs as cli_runs

    root, ids = listed
    console = cli_runs.out
    buf = _terminal(monkeypatch, 80)
    assert tunelab("runs", "list", "--wide")[0] == 0
    wide = buf.getvalue()
    assert HUB_CACHE in wide and "c" * 64 in wide and str(root / "evals" / "a") in wide
    assert max(map(len, wide.splitlines())) > 80 and "…" not in wide  # lines as long as the values need
    monkeypatch.setattr(cli_runs, "out", console)
    code, piped, _ = tunelab("runs", "list")  # stdout is not a terminal under pytest: tab-separated lines
    assert code == 0
    head, *lines = piped.splitlines()
    assert head.split("\t") == ["id", "kind", "name", "hash", "metric", "score", "created", "path"]
    rows = {int(line.split("\t")[0]): line.split("\t") for line in lines}
    assert all(len(r) == 8 for r in rows.values()) and len(rows) == len(list_artifacts())
    assert rows[ids["cache_base"]][2] == HUB_CACHE and rows[ids["eval_a"]][4:6] == ["json_exact", "0.6"]


def test_runs_lineage_accepts_an_index_folder(db, tunelab, tmp_path, monkeypatch):
    """`tunelab rag index` writes OUT/index.json naming the current version and registers OUT/v1, OUT/v2; the
    folder stands for its current version (here v1, rolled back to), given as typed (relative)."""
    from tunelab.runs import record_index

    out, corpus = tmp_path / "idx", tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n')
    for v in ("v1", "v2"):
        layout.write_manifest(out / v, "index", {"key": f"key-{v}", "version": v, "retrieval": {"kind": "bm25"},
                                                 "corpus": {"path": str(corpus), "sha256": file_sha256(corpus)}})
        record_index(out / v)
    layout.write_manifest(out, "index", {"current": "v1", "versions": {"v1": "key-v1", "v2": "key-v2"}})
    monkeypatch.chdir(tmp_path)
    assert lineage("idx")["path"] == str((out / "v1").resolve())
    assert show(str(out))["hash"] == "key-v1"
    code, text, err = tunelab("runs", "lineage", "idx", "--json")
    assert code == 0, err
    tree = json.loads(text)
    assert tree["name"] == "idx/v1" and [p["kind"] for p in tree["parents"]] == ["dataset"]
