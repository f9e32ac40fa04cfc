"""The PostgreSQL + pgvector store against a real server (pgserver): same answers as the embedded store."""

import json

import psycopg
import pytest

from tunelab.errors import TunelabError
from tunelab.rag import build_index, evaluate_retrieval, load_index
from tunelab.tasks import load_task

TASK = "handbook-qa"


def test_vector_text_names_every_float32_exactly():
    import numpy as np

    from tunelab.rag.pg import _vector

    v = np.random.default_rng(0).standard_normal((50, 384)).astype(np.float32)
    v[0, :4] = [np.float32(1e-38), np.float32(3.4e38), np.nextafter(np.float32(1), np.float32(2)), 0.0]
    back = np.array([[np.float32(x) for x in _vector(r)[1:-1].split(",")] for r in v])
    assert np.array_equal(back, v)  # strtof in pgvector reads the same float32 back


@pytest.fixture(scope="module")
def pg_uri(tmp_path_factory):
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="module")
def both(tmp_path_factory, pg_uri):
    """The handbook corpus indexed twice with the same embedder: files, and PostgreSQL."""
    folder = tmp_path_factory.mktemp("idx")
    files, pg = build_index(TASK, folder / "files"), build_index(TASK, folder / "pg", store=pg_uri)
    yield files, pg
    pg.close()


def test_dense_exact_search_matches_the_embedded_store(both):
    files, pg = both
    assert pg.manifest["store"]["kind"] == "postgresql" and not (pg.folder / "chunks.jsonl").exists()
    assert pg.manifest["embedder"]["sha256"] == files.manifest["embedder"]["sha256"]
    exact = load_index(pg.folder, exact=True)
    task = load_task(TASK)
    questions = [task.prompt(ex) for ex in task.examples("test")]
    vecs = files.embedder.encode(questions)
    want = [[i for i, _ in r] for r in files.store.dense(vecs, 5)]
    got = [[i for i, _ in r] for r in exact.store.dense(vecs, 5)]
    assert got == want  # identical ids, in order, for all 200 questions
    hnsw = [[i for i, _ in r] for r in pg.store.dense(vecs, 5)]
    assert sum(a == b for a, b in zip(hnsw, want)) >= 0.95 * len(want)  # the approximate index, nearly always


def test_hybrid_recall_matches_the_embedded_store(both):
    files, pg = both
    r_files = evaluate_retrieval(files, TASK, k=5)
    r_pg = evaluate_retrieval(pg, TASK, k=5)
    print(f"hybrid recall@5: embedded {r_files['recall_at_k']:.3f}, postgresql {r_pg['recall_at_k']:.3f}; "
          f"MRR {r_files['mrr']:.3f} / {r_pg['mrr']:.3f}")
    assert abs(r_pg["recall_at_k"] - r_files["recall_at_k"]) <= 0.02
    lex = pg.store.lexical(["Who is Liam Silva's manager?"], 3)[0]
    assert "person-043#0" in [i for i, _ in lex]  # full-text search alone finds the person (no IDF: not first)


def test_a_new_corpus_is_a_new_table_and_the_old_version_still_answers(tmp_path, pg_uri, both):
    _, pg = both
    before = pg.search("Who is Liam Silva's manager?", k=5)
    docs = load_task(TASK).corpus()[:10]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(d) + "\n" for d in docs))
    other = build_index(small, tmp_path / "pg", store=pg_uri, kind="bm25")
    assert other.manifest["store"]["table"] != pg.manifest["store"]["table"]
    assert load_index(pg.folder).search("Who is Liam Silva's manager?", k=5) == before
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        conn.execute(f"COMMENT ON TABLE {other.manifest['store']['table']} IS 'someone-else'")
    with pytest.raises(TunelabError, match="holds index someone-els"):
        load_index(other.folder)
