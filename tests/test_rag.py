"""Retrieval: chunking, BM25 / dense / hybrid on handbook-qa (recall targets), versions, drift, registry, prompts."""

import json
import shutil
import sqlite3

import pytest

from tunelab.errors import TunelabError
from tunelab.rag import (
    TEMPLATE,
    Hit,
    augment_messages,
    build_index,
    evaluate_retrieval,
    load_index,
    read_corpus,
    retrieval_augment,
    rrf,
    with_passages,
)
from tunelab.runs import registry_path
from tunelab.tasks import load_task

TASK = "handbook-qa"


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return build_index(TASK, tmp_path_factory.mktemp("idx") / "handbook")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The first 20 handbook documents as a JSONL file of their own."""
    docs = load_task(TASK).corpus()[:20]
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- corpus and chunks ---------------------------------------------------------------------------------------
def test_chunks_are_overlapping_token_windows_on_word_boundaries():
    from tunelab.rag.corpus import Doc, chunk_docs
    from tunelab.rag.embed import load_chunk_tokenizer

    tok = load_chunk_tokenizer(None)
    text = " ".join(f"word{i} is here." for i in range(60))  # "word12" is two tokens: a window may not split it
    chunks = chunk_docs([Doc("d", text, "T")], tok, chunk_tokens=32, overlap=8)
    assert len(chunks) > 3 and all(c.doc_id == "d" for c in chunks)
    assert [c.id for c in chunks[:2]] == ["d#0", "d#1"]
    full = tok(text, add_special_tokens=False)["input_ids"]
    spans = []
    for c in chunks:  # each chunk re-tokenizes to exactly its window of the document's tokens: no word cut
        ids = tok(c.text, add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(full)) if full[i:i + len(ids)] == ids)
        spans.append((start, start + len(ids)))
        assert len(ids) <= 32
    assert spans[0][0] == 0 and spans[-1][1] == len(full)  # the windows cover the document
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert 8 <= end - start <= 10  # about `overlap` tokens, rounded back to a word start


def test_corpus_from_task_jsonl_and_folder(tmp_path, small_corpus):
    docs, info = read_corpus(TASK)
    assert info["task"] == TASK and info["docs"] == len(docs) == 172
    small, sinfo = read_corpus(small_corpus)
    assert [d.id for d in small] == [d.id for d in docs[:20]] and sinfo["sha256"] != info["sha256"]
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "leave.md").write_text("# Leave policy\nEveryone gets 30 days.\n")
    (tmp_path / "md" / "notes.txt").write_text("Badges open the Cork office.")
    folder, finfo = read_corpus(tmp_path / "md")
    assert [(d.id, d.title) for d in folder] == [("leave.md", "Leave policy"), ("notes.txt", "notes")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\n{"id": "b"}\n')
    with pytest.raises(TunelabError, match=r"bad.jsonl:2: a corpus row needs `id` and `text`"):
        read_corpus(bad)


# --- fusion and prompt ---------------------------------------------------------------------------------------
def test_rrf_adds_reciprocal_ranks():
    fused = rrf([[("a", 9.0), ("b", 5.0)], [("b", 0.9), ("c", 0.8)]], k=60)
    assert [i for i, _ in fused] == ["b", "a", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61) and fused[1][1] == pytest.approx(1 / 61)


def test_with_passages_fills_the_one_template():
    hits = [Hit("d1#0", "d1", "Cork is in Ireland.", "Offices", 1.0), Hit("d2#0", "d2", "Brno.", "", 0.5)]
    text = with_passages("Where is Cork?", hits)
    assert text == "Context:\n[1] Offices\nCork is in Ireland.\n\n[2] (untitled)\nBrno.\n\nWhere is Cork?"
    assert TEMPLATE.startswith("Context:")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Cork?"}]
    out = with_passages(msgs, hits)
    assert out[0] == msgs[0] and out[1]["content"] == text and msgs[1]["content"] == "Where is Cork?"
    assert with_passages(msgs, []) == msgs


# --- quality on handbook-qa ----------------------------------------------------------------------------------
def test_hybrid_recall_at_5_meets_the_target(hybrid):
    r = evaluate_retrieval(hybrid, TASK, k=5)
    print(f"hybrid recall@5 {r['recall_at_k']:.3f} MRR {r['mrr']:.3f} (n={r['n']})")
    assert r["n"] == 200 and r["recall_at_k"] >= 0.95 and 0 < r["mrr"] <= r["recall_at_k"]


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_single_retrievers_find_most_gold_passages(tmp_path, kind):
    idx = build_index(TASK, tmp_path / kind, kind=kind)
    r = evaluate_retrieval(idx, TASK, k=5)
    print(f"{kind} recall@5 {r['recall_at_k']:.3f} MRR {r['mrr']:.3f}")
    assert r["recall_at_k"] >= 0.6
    assert (idx.manifest["embedder"] is None) == (kind == "bm25")


def test_search_returns_chunks_mapped_to_their_documents(hybrid):
    task = load_task(TASK)
    ex = task.examples("test", limit=1)[0]
    hits = hybrid.search(task.prompt(ex), k=3)
    assert len(hits) == 3 and hits[0].doc_id == ex["doc_id"] and hits[0].id.startswith(ex["doc_id"] + "#")
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert hybrid.search_many([task.prompt(ex)], k=3) == [hits]


def test_hits_say_where_their_scores_come_from(hybrid, tmp_path):
    """Each hit carries its rank, what its score is (RRF for hybrid), and each retriever's own rank and score,
    exactly as that retriever ranked the chunk; the RRF score is the sum of 1 / (60 + those ranks)."""
    q = "Who is Liam Silva's manager?"
    hits = hybrid.search(q, k=5)
    n = hybrid.config.candidates
    own = {"bm25": hybrid.store.lexical([q], n)[0], "dense": hybrid.store.dense(hybrid.embedder.encode([q]), n)[0]}
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and {h.score_name for h in hits} == {"rrf"}
    for h in hits:
        assert h.stages and set(h.stages) <= {"bm25", "dense"}
        for stage, ranking in own.items():
            ranks = {cid: (r, s) for r, (cid, s) in enumerate(ranking, 1)}
            if stage in h.stages:
                assert (h.stages[stage]["rank"], h.stages[stage]["score"]) == ranks[h.id]
            else:
                assert h.id not in ranks
        assert h.score == pytest.approx(sum(1 / (60 + s["rank"]) for s in h.stages.values()))
    top = hits[0].stages
    assert -1 <= top["dense"]["score"] <= 1 and top["bm25"]["score"] > 0
    bm25 = build_index(TASK, tmp_path / "bm25", kind="bm25").search(q, k=2)
    assert [(h.rank, h.score_name, set(h.stages)) for h in bm25] == [(1, "bm25", {"bm25"}), (2, "bm25", {"bm25"})]
    assert bm25[0].stages["bm25"] == {"rank": 1, "score": bm25[0].score}


def test_a_bfloat16_embedder_is_recorded_and_queries_in_its_own_dtype(tmp_path, hybrid):
    import numpy as np
    import torch

    bf = build_index(TASK, tmp_path / "bf16", embed_dtype="bfloat16")
    assert bf.manifest["embedder"]["dtype"] == "bfloat16" and hybrid.manifest["embedder"]["dtype"] == "float32"
    assert bf.manifest["key"] != hybrid.manifest["key"]  # other vectors: another version, never the same one
    opened = load_index(tmp_path / "bf16")
    assert opened.embedder.dtype == "bfloat16"
    assert next(opened.embedder.model.parameters()).dtype == torch.bfloat16
    task = load_task(TASK)
    questions = [task.prompt(ex) for ex in task.examples("test")]
    v32, v16 = hybrid.embedder.encode(questions), opened.embedder.encode(questions)
    assert v16.dtype == np.float32 and not np.array_equal(v32, v16) and (v32 * v16).sum(1).min() > 0.99
    top32 = [r[0][0] for r in hybrid.store.dense(v32, 1)]
    top16 = [r[0][0] for r in opened.store.dense(v16, 1)]
    assert sum(a == b for a, b in zip(top32, top16)) >= 0.97 * len(questions)  # 200 of 200 when measured
    r32, r16 = evaluate_retrieval(hybrid, TASK, k=5), evaluate_retrieval(opened, TASK, k=5)
    assert r16["recall_at_k"] >= 0.95 and abs(r16["recall_at_k"] - r32["recall_at_k"]) <= 0.01


# --- versions, determinism, registry --------------------------------------------------------------------------
def test_same_inputs_rebuild_the_same_version_a_changed_corpus_is_a_new_one(tmp_path, small_corpus):
    out = tmp_path / "idx"
    first = build_index(small_corpus, out)
    v1 = _files(out / "v1")
    again = build_index(small_corpus, out)
    assert again.folder == first.folder == out / "v1" and _files(out / "v1") == v1  # byte for byte
    assert _files(build_index(small_corpus, tmp_path / "elsewhere").folder) == v1
    rows = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    rows[3]["text"] += " The office cat is called Biscuit."
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = build_index(changed, out)
    assert second.folder == out / "v2" and _files(out / "v1") == v1  # the old version is untouched
    top = json.loads((out / "index.json").read_text())
    assert top["current"] == "v2" and top["versions"] == {"v1": first.manifest["key"], "v2": second.manifest["key"]}
    assert load_index(out).folder == out / "v2" and load_index(out / "v1").manifest["key"] == first.manifest["key"]
    assert second.search("What is the office cat called?", k=1)[0].doc_id == rows[3]["id"]
    conn = sqlite3.connect(registry_path())
    got = conn.execute("SELECT version, key, corpus_sha256 FROM indexes WHERE path LIKE ? ORDER BY version",
                       (str(out) + "/%",)).fetchall()
    assert got == [("v1", first.manifest["key"], first.manifest["corpus"]["sha256"]),
                   ("v2", second.manifest["key"], second.manifest["corpus"]["sha256"])]
    parents = conn.execute("SELECT e.role, a.kind, a.hash FROM edges e JOIN artifacts a ON a.id = e.parent "
                           "JOIN artifacts i ON i.id = e.child WHERE i.path = ? ORDER BY e.role",
                           (str(out / "v2"),)).fetchall()
    assert parents == [("corpus", "dataset", second.manifest["corpus"]["sha256"]),
                       ("embedder", "base_model", second.manifest["embedder"]["sha256"])]


def test_an_out_folder_that_is_not_an_index_is_never_overwritten(tmp_path, small_corpus):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TunelabError, match="is not a tunelab index"):
        build_index(small_corpus, tmp_path, kind="bm25")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(TunelabError, match="overlap .* must be smaller than chunk_tokens"):
        build_index(small_corpus, tmp_path / "x", chunk_tokens=16, overlap=16)


@pytest.fixture(scope="module")
def other_embedder(tmp_path_factory):
    """The MiniLM folder with its weights nudged: another model as far as the index is concerned."""
    import torch
    from safetensors.torch import load_file, save_file

    from tunelab.rag.embed import resolve_embedder

    src = resolve_embedder(None)
    dst = tmp_path_factory.mktemp("emb") / "minilm-tuned"
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = next(n for n in weights if n.endswith("word_embeddings.weight"))
    weights[name] = weights[name] + 0.01 * torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, dst / "model.safetensors")
    return dst


def test_querying_with_another_embedder_is_refused(tmp_path, small_corpus, other_embedder):
    out = tmp_path / "idx"
    build_index(small_corpus, out, kind="dense")
    with pytest.raises(TunelabError, match="embedding drift"):
        load_index(out, embedder=other_embedder)
    assert load_index(out, embedder="minilm").search("Tariq Novak", k=1)  # the same model is fine
    tuned = build_index(small_corpus, out, kind="dense", embedder=other_embedder)
    assert tuned.folder == out / "v2" and (out / "v1").is_dir()  # a new version, not an overwrite
    with pytest.raises(TunelabError, match="embedding drift"):
        load_index(out / "v1", embedder=other_embedder)
    assert load_index(out / "v2").search("Tariq Novak", k=1)  # its own embedder, as recorded
    with pytest.raises(TunelabError, match="embedding drift"):
        load_index(out / "v2", embedder="minilm")
    from safetensors.torch import load_file, save_file

    weights = load_file(other_embedder / "model.safetensors")  # the embedder's weights change in place
    save_file({n: t * 1.01 for n, t in weights.items()}, other_embedder / "model.safetensors")
    with pytest.raises(TunelabError, match="embedding drift"):
        load_index(out / "v2").search("Tariq Novak", k=1)


# --- eval with retrieval ---------------------------------------------------------------------------------------
def test_eval_with_retrieved_passages_reaches_the_model(tmp_path, hybrid):
    """An echoing fake model 'answers' with its prompt: the gold answer is in it only when retrieval put the
    right passage there, so `contains` goes from 0 without RAG to about recall@k with it."""
    from tunelab.evaluate.harness import default_variants, run_variants
    from tunelab.infer.testing import FakeEngine

    task = load_task(TASK)

    def echo(q):  # the whole user turn on one line (the task stops at a newline)
        return q.prompt[-1]["content"].replace("\n", " ")

    plain = run_variants(FakeEngine(echo), task, default_variants([], False), tmp_path / "plain", limit=20,
                         max_new_tokens=500, write_html=False)
    augment = retrieval_augment(hybrid, task, limit=20, k=3)
    engine = FakeEngine(echo)
    rag = run_variants(engine, task, default_variants([], False), tmp_path / "rag", limit=20, max_new_tokens=500,
                       write_html=False, augment=augment)
    assert plain.metrics["base"]["metrics"]["contains"]["score"] == 0.0
    assert rag.metrics["base"]["metrics"]["contains"]["score"] >= 0.9
    assert engine.requests[0].prompt[-1]["content"].startswith("Context:\n[1] ")
    assert engine.requests[0].prompt[0]["role"] == "system"
    meta = json.loads((tmp_path / "rag" / "base" / "metrics.json").read_text())
    assert meta["augment"] == {"index": str(hybrid.folder), "key": hybrid.manifest["key"], "kind": "hybrid", "k": 3}


# --- CLI -------------------------------------------------------------------------------------------------------
def test_cli_index_query_eval(tunelab, tmp_path):
    code, out, err = tunelab("rag", "index", TASK, "--out", tmp_path / "idx", "--kind", "bm25", "--json")
    assert code == 0, err
    assert json.loads(out)["chunks"] == 172
    code, out, err = tunelab("rag", "query", tmp_path / "idx", "Who is Liam Silva's manager?", "-k", "2", "--json")
    assert code == 0, err
    hits = json.loads(out)
    assert len(hits) == 2 and hits[0]["doc_id"] == "person-043"
    assert hits[0]["rank"] == 1 and hits[0]["score_name"] == "bm25"
    assert hits[0]["stages"] == {"bm25": {"rank": 1, "score": hits[0]["score"]}}
    code, out, err = tunelab("rag", "eval", tmp_path / "idx", "--task", TASK, "--limit", "50", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["n"] == 50 and r["recall_at_k"] >= 0.6
    code, out, err = tunelab("rag", "query", tmp_path / "idx", "anything", "--embedder", "minilm")
    assert code == 2 and "embedding drift" in err


def test_cli_query_names_its_scores(tunelab, hybrid):
    """The table says what the fused score is (RRF, and what 0.0328 means) and shows each retriever's own rank
    and score (BM25 score, cosine similarity) beside it."""
    code, out, err = tunelab("rag", "query", hybrid.folder, "Who is Liam Silva's manager?", "-k", "3")
    assert code == 0, err
    text = " ".join(out.split())
    assert "RRF" in text and "BM25" in text and "cosine" in text
    assert "reciprocal-rank fusion: each retriever adds 1 / (60 + its rank), so 0.0328 = first in both" in text
    assert "cosine similarity" in text and "BM25 keyword score" in text
    top = hybrid.search("Who is Liam Silva's manager?", k=1)[0]
    assert f"#{top.stages['bm25']['rank']} {top.stages['bm25']['score']:.4g}" in text


def test_cli_eval_and_generate_with_rag(tunelab, tmp_path, tiny_model_dir, hybrid):
    code, out, err = tunelab("eval", "--task", TASK, "--model", tiny_model_dir, "--rag", hybrid.folder, "-k", "2",
                             "--limit", "2", "--out", tmp_path / "ev", "--device", "cpu")
    assert code == 0, err
    meta = json.loads((tmp_path / "ev" / "base" / "metrics.json").read_text())
    assert meta["augment"]["k"] == 2 and meta["n"] == 2
    code, out, err = tunelab("generate", "Who is Liam Silva's manager?", "--model", tiny_model_dir, "--rag",
                             hybrid.folder, "--max-new-tokens", "2", "--device", "cpu")
    assert code == 0, err
    msgs = augment_messages(hybrid.folder, [{"role": "user", "content": "Who is Liam Silva's manager?"}],
                            "Who is Liam Silva's manager?", k=1)
    assert msgs[0]["content"].startswith("Context:\n[1] People directory: Liam Silva\n")


# --- options: stemmer, reranker ------------------------------------------------------------------------------
def test_bm25_stemmer_matches_word_forms(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "Travel policies cover flights."}\n'
                      '{"id": "b", "text": "The canteen opens at noon."}\n')
    plain = build_index(corpus, tmp_path / "plain", kind="bm25")
    stemmed = build_index(corpus, tmp_path / "stem", kind="bm25", stemmer="english")
    assert plain.search("travel policy", k=2)[0].doc_id == "a"
    assert plain.search("policy flight", k=2) == []  # no shared word form
    assert [h.doc_id for h in stemmed.search("policy flight", k=2)] == ["a"]
    assert [h.doc_id for h in load_index(stemmed.folder).search("policy flight", k=2)] == ["a"]
    with pytest.raises(TunelabError, match="unknown stemmer language 'klingon'"):
        build_index(corpus, tmp_path / "k", kind="bm25", stemmer="klingon")


def test_a_reranker_reorders_the_fused_candidates(tmp_path, small_corpus, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    idx = build_index(small_corpus, tmp_path / "idx", reranker=tiny_cross_encoder)
    assert idx.manifest["reranker"]["path"] == str(tiny_cross_encoder)
    assert idx.manifest["key"] != build_index(small_corpus, tmp_path / "idx").manifest["key"]  # not overwritten
    q = "Who is Tariq Novak's manager?"
    hits = load_index(idx.folder).search(q, k=5)
    plain = load_index(idx.folder)
    plain.reranker = None  # the fused order the reranker starts from
    candidates = plain.search(q, k=plain.config.candidates)
    ce = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    scores = ce.predict([(q, f"{h.title}\n{h.text}") for h in candidates])
    want = [candidates[i].id for i in sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i].id))]
    assert [h.id for h in hits] == want[:5]
    assert [h.score for h in hits] == pytest.approx(sorted(scores, reverse=True)[:5], abs=1e-5)
