"""Retrieval speed and quality: BM25, dense and hybrid indexes, embedded files and PostgreSQL + pgvector.

Per corpus (the handbook-qa corpus, and a synthetic corpus of --chunks one-chunk documents, 100k by default)
and per index (kind x store) it prints: build time, queries per second (k=5, the queries searched in one
batch; PostgreSQL answers one query per round trip; its lexical side is full-text search, not BM25) and
recall@5 against the gold document. The peer is
`rank_bm25` (BM25Okapi, pure Python), the naive BM25 everyone starts with, on the same chunks and queries.
Target on handbook-qa: hybrid recall@5 >= 0.95.

    python bench/retrieval.py                       # handbook + 100k synthetic chunks (dense takes a while)
    python bench/retrieval.py --chunks 5000 --no-pg # smaller, embedded stores only
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import check, fmt, log, print_table, save_json

K = 5


def synthetic_corpus(folder: Path, n: int, queries: int, seed: int = 0) -> tuple[Path, list[tuple[str, str]]]:
    """n documents of ~30 words over a 20k-word vocabulary, each naming a unique product code and owner;
    queries ask for one document's code by its owner and two of its words. Returns (JSONL, [(query, doc)])."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "do", "ga"]
    vocab = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(2, 4))) for _ in range(30000)})[:20000]
    path = folder / f"synthetic-{n}.jsonl"
    asks = []
    pick = set(rng.sample(range(n), min(queries, n)))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = rng.choices(vocab, k=24)
            owner = f"{rng.choice(vocab).title()} {rng.choice(vocab).title()}"
            text = f"{' '.join(words[:12])}. Product code Q{i:06d} belongs to {owner}. {' '.join(words[12:])}."
            f.write(json.dumps({"id": f"syn-{i}", "title": f"Record {i}", "text": text}) + "\n")
            if i in pick:
                asks.append((f"Which product code does {owner} own, the {words[3]} {words[15]} one?", f"syn-{i}"))
    return path, asks


def handbook_queries() -> tuple[str, list[tuple[str, str]]]:
    from tunelab.tasks import load_task

    task = load_task("handbook-qa")
    return "handbook-qa", [(task.prompt(ex), ex["doc_id"]) for ex in task.examples("test")]


def recall(found: list[list[str]], gold: list[str]) -> float:
    return sum(g in docs for docs, g in zip(found, gold)) / len(gold)


def bench_index(corpus, out: Path, kind: str, store: str | None, asks) -> dict:
    from tunelab.rag import build_index

    t0 = time.perf_counter()
    idx = build_index(corpus, out, kind=kind, store=store)
    build_s = time.perf_counter() - t0
    qs, gold = [q for q, _ in asks], [d for _, d in asks]
    idx.search_many(qs[:2], K)  # warm: the embedder's first batch, the database connection
    t0 = time.perf_counter()
    hits = idx.search_many(qs, K)
    qps = len(qs) / (time.perf_counter() - t0)
    return {"build_s": build_s, "qps": qps, "recall": recall([[h.doc_id for h in hs] for hs in hits], gold),
            "chunks": idx.manifest["chunks"]}


def bench_rank_bm25(corpus: Path | str, asks, max_queries: int) -> dict:
    """BM25Okapi over the same documents (one chunk each here), lower-cased whitespace tokens."""
    import re

    from rank_bm25 import BM25Okapi

    from tunelab.rag import read_corpus

    docs, _ = read_corpus(corpus)
    tok = re.compile(r"\w\w+")
    t0 = time.perf_counter()
    bm = BM25Okapi([tok.findall(f"{d.title}\n{d.text}".lower()) for d in docs])
    build_s = time.perf_counter() - t0
    sub = asks[:max_queries]
    t0 = time.perf_counter()
    found = []
    for q, _ in sub:
        scores = bm.get_scores(tok.findall(q.lower()))
        top = sorted(range(len(docs)), key=lambda i: -scores[i])[:K]
        found.append([docs[i].id for i in top])
    qps = len(sub) / (time.perf_counter() - t0)
    return {"build_s": build_s, "qps": qps, "recall": recall(found, [d for _, d in sub]), "chunks": len(docs),
            "queries": len(sub)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000, help="synthetic corpus size (0: handbook only)")
    ap.add_argument("--queries", type=int, default=200, help="synthetic queries")
    ap.add_argument("--baseline-queries", type=int, default=50, help="rank_bm25 queries (it scans every doc)")
    ap.add_argument("--kinds", default="bm25,dense,hybrid")
    ap.add_argument("--no-pg", action="store_true", help="skip PostgreSQL (needs the pg extra: pgserver)")
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    server = None
    uri = None
    if not args.no_pg:
        import pgserver

        server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
        server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
        uri = server.get_uri()
    corpora = [handbook_queries()]
    if args.chunks:
        path, asks = synthetic_corpus(tmp, args.chunks, args.queries)
        corpora.append((str(path), asks))
    results: dict = {}
    try:
        for corpus, asks in corpora:
            name = "handbook-qa" if corpus == "handbook-qa" else f"synthetic {args.chunks:,}"
            rows = []
            base = bench_rank_bm25(corpus, asks, args.baseline_queries)
            log.print(f"{name}: rank_bm25 done")
            rows.append(["rank_bm25 (peer)", "memory", base["chunks"], fmt(base["build_s"], 2), fmt(base["qps"]),
                         "1.00x", fmt(base["recall"], 3)])
            results[name] = {"rank_bm25": base}
            for store in ([None] + ([uri] if uri else [])):
                where = "postgresql" if store else "embedded"
                for kind in kinds:
                    r = bench_index(corpus, tmp / f"{name}-{where}-{kind}".replace(" ", "_"), kind, store, asks)
                    log.print(f"{name}: {kind} {where} done")
                    results[name][f"{kind}/{where}"] = r
                    label = "full-text" if store and kind == "bm25" else kind  # PostgreSQL's lexical side
                    rows.append([label, where, r["chunks"], fmt(r["build_s"], 2), fmt(r["qps"]),
                                 f"{r['qps'] / base['qps']:.2f}x", fmt(r["recall"], 3)])
            hybrid = results[name].get("hybrid/embedded", {}).get("recall")
            caption = (f"target: hybrid recall@5 >= 0.95 {check(hybrid >= 0.95)}"
                       if name == "handbook-qa" and hybrid is not None else None)
            print_table(f"retrieval on {name} ({len(asks)} queries, k={K}; rank_bm25 on "
                        f"{base['queries']})", ["index", "store", "chunks", "build s", "queries/s", "vs rank_bm25",
                                                f"recall@{K}"], rows, caption)
    finally:
        if server is not None:
            server.cleanup()
    save_json(args.out, {"argv": sys.argv[1:], "results": results})


if __name__ == "__main__":
    main()
