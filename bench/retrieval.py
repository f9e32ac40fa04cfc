"""Retrieval speed and quality: BM25, dense and hybrid indexes, embedded files and PostgreSQL + pgvector.

Per corpus (the handbook-qa corpus, and a synthetic corpus of --chunks one-chunk documents of --words English
words, 100k x 60 by default) and per index (kind x store) it prints: build time (and the embedding's share),
queries per second (k=5, the queries searched in one batch; PostgreSQL answers one query per round trip; its
lexical side is full-text search, not BM25) and recall@5 against the gold document. The peer is `rank_bm25`
(BM25Okapi, pure Python), the naive BM25 everyone starts with, on the same chunks and queries.
A corpus's chunks are embedded once, by its first dense or hybrid build; the other dense and hybrid builds
reuse those vectors (same texts, same embedder and dtype: the same vectors) and their build time adds the
embedding time measured then to their own. Target on handbook-qa: hybrid recall@5 >= 0.95.

    python bench/retrieval.py --embed-dtype bfloat16   # handbook + 100k synthetic chunks (~30 min on 2 cores)
    python bench/retrieval.py --chunks 5000 --no-pg    # smaller, embedded stores only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _common import check, fmt, log, print_table, save_json

K = 5


def synthetic_corpus(folder: Path, n: int, queries: int, words: int = 60,
                     seed: int = 0) -> tuple[Path, list[tuple[str, str]]]:
    """n documents of `words` English words each (drawn Zipf-like from the embedder's whole-word vocabulary,
    so they tokenize like prose, ~1.1 tokens a word), each naming a unique product code and its owner; queries
    ask for one document's code by its owner and two of its words. Returns (JSONL, [(query, doc)])."""
    from tunelab.rag.embed import load_chunk_tokenizer

    rng = random.Random(seed)
    vocab = sorted(w for w in load_chunk_tokenizer(None).get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    rng.shuffle(vocab)
    weights = [1.0 / (r + 10) for r in range(len(vocab))]  # Zipf-like: a few words are common, most rare
    path = folder / f"synthetic-{n}x{words}.jsonl"
    asks = []
    pick = set(rng.sample(range(n), min(queries, n)))
    fill = max(words - 6, 2)  # "Product code Q000000 belongs to A B." is 6 words
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            w = rng.choices(vocab, weights, k=fill)
            owner = f"{rng.choice(vocab).title()} {rng.choice(vocab).title()}"
            text = f"{' '.join(w[:fill // 2])}. Product code Q{i:06d} belongs to {owner}. {' '.join(w[fill // 2:])}."
            f.write(json.dumps({"id": f"syn-{i}", "title": f"Record {i}", "text": text}) + "\n")
            if i in pick:
                asks.append((f"Which product code does {owner} own, the {w[3]} {w[-4]} one?", f"syn-{i}"))
    return path, asks


def handbook_queries() -> tuple[str, list[tuple[str, str]]]:
    from tunelab.tasks import load_task

    task = load_task("handbook-qa")
    return "handbook-qa", [(task.prompt(ex), ex["doc_id"]) for ex in task.examples("test")]


def recall(found: list[list[str]], gold: list[str]) -> float:
    return sum(g in docs for docs, g in zip(found, gold)) / len(gold)


@contextmanager
def embed_once(cache: dict):
    """Within the block, an embedder encodes a list of texts it has encoded before from `cache` (texts hash ->
    (vectors, seconds the real encode took)); `cache["last"]` is (those seconds, reused?) for the last list."""
    from tunelab.rag.embed import Embedder

    real = Embedder.encode

    def encode(self, texts, batch_size=None):
        key = hashlib.sha256(json.dumps([self.identity["sha256"], self.dtype, list(texts)]).encode()).hexdigest()
        reused = key in cache
        if not reused:
            t0 = time.perf_counter()
            vecs = real(self, texts) if batch_size is None else real(self, texts, batch_size)
            cache[key] = (vecs, time.perf_counter() - t0)
        cache["last"] = (cache[key][1], reused)
        return cache[key][0]

    Embedder.encode = encode
    try:
        yield
    finally:
        Embedder.encode = real


def bench_index(corpus, out: Path, kind: str, store: str | None, asks, embed_dtype: str, cache: dict) -> dict:
    from tunelab.rag import build_index

    cache["last"] = (None, False)
    with embed_once(cache):
        t0 = time.perf_counter()
        idx = build_index(corpus, out, kind=kind, store=store, embed_dtype=embed_dtype)
        build_s = time.perf_counter() - t0
    embed_s, reused = cache["last"]
    if reused:
        build_s += embed_s  # this build took the vectors from the cache: count the embedding it would have done
    qs, gold = [q for q, _ in asks], [d for _, d in asks]
    idx.search_many(qs[:2], K)  # warm: the embedder's first batch, the database connection
    t0 = time.perf_counter()
    hits = idx.search_many(qs, K)
    qps = len(qs) / (time.perf_counter() - t0)
    idx.close()
    return {"build_s": build_s, "embed_s": embed_s, "embed_reused": reused, "qps": qps,
            "recall": recall([[h.doc_id for h in hs] for hs in hits], gold), "chunks": idx.manifest["chunks"]}


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


def chunk_sizes(corpus: str) -> str:
    """Mean words and embedder tokens (title included) of the first 2,000 documents' text, for the caption."""
    from tunelab.rag import read_corpus
    from tunelab.rag.embed import load_chunk_tokenizer

    docs = read_corpus(corpus)[0][:2000]
    texts = [f"{d.title}\n{d.text}" for d in docs]
    tokens = sum(len(ids) for ids in load_chunk_tokenizer(None)(texts)["input_ids"])
    return f"{sum(len(t.split()) for t in texts) / len(texts):.0f} words / {tokens / len(texts):.0f} tokens a chunk"


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000, help="synthetic corpus size (0: handbook only)")
    ap.add_argument("--words", type=int, default=60, help="words of a synthetic document (one chunk)")
    ap.add_argument("--queries", type=int, default=200, help="synthetic queries")
    ap.add_argument("--baseline-queries", type=int, default=50, help="rank_bm25 queries (it scans every doc)")
    ap.add_argument("--kinds", default="bm25,dense,hybrid")
    ap.add_argument("--embed-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the embedder's compute dtype (bfloat16: ~1.7x faster on AVX512-BF16 CPUs)")
    ap.add_argument("--no-pg", action="store_true", help="skip PostgreSQL (needs the pg extra: pgserver)")
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    start = time.perf_counter()
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
        path, asks = synthetic_corpus(tmp, args.chunks, args.queries, args.words)
        corpora.append((str(path), asks))
    results: dict = {"embed_dtype": args.embed_dtype, "torch_threads": torch.get_num_threads()}
    if set(kinds) - {"bm25"}:  # imports and the first model load, not counted in any build
        from tunelab.rag.embed import Embedder

        Embedder.load(None, args.embed_dtype).encode(["warm up"])
    try:
        for corpus, asks in corpora:
            name = "handbook-qa" if corpus == "handbook-qa" else f"synthetic {args.chunks:,}"
            rows = []
            base = bench_rank_bm25(corpus, asks, args.baseline_queries)
            log.print(f"{name}: rank_bm25 done ({time.perf_counter() - start:.0f} s)")
            rows.append(["rank_bm25 (peer)", "memory", base["chunks"], fmt(base["build_s"], 2), None,
                         fmt(base["qps"]), "1.00x", fmt(base["recall"], 3)])
            results[name] = {"rank_bm25": base, "sizes": chunk_sizes(corpus)}
            cache: dict = {}  # the corpus's chunks are embedded once
            for store in ([None] + ([uri] if uri else [])):
                where = "postgresql" if store else "embedded"
                for kind in kinds:
                    r = bench_index(corpus, tmp / f"{name}-{where}-{kind}".replace(" ", "_"), kind, store, asks,
                                    args.embed_dtype, cache)
                    log.print(f"{name}: {kind} {where} done ({time.perf_counter() - start:.0f} s)")
                    results[name][f"{kind}/{where}"] = r
                    label = "full-text" if store and kind == "bm25" else kind  # PostgreSQL's lexical side
                    embed = "reused" if r["embed_reused"] else fmt(r["embed_s"], 2)
                    rows.append([label, where, r["chunks"], fmt(r["build_s"], 2), embed, fmt(r["qps"]),
                                 f"{r['qps'] / base['qps']:.2f}x", fmt(r["recall"], 3)])
            hybrid = results[name].get("hybrid/embedded", {}).get("recall")
            caption = (f"{results[name]['sizes']}; embedder MiniLM in {args.embed_dtype} on "
                       f"{torch.get_num_threads()} torch threads")
            if name == "handbook-qa" and hybrid is not None:
                caption += f"\ntarget: hybrid recall@5 >= 0.95 {check(hybrid >= 0.95)}"
            print_table(f"retrieval on {name} ({len(asks)} queries, k={K}; rank_bm25 on {base['queries']})",
                        ["index", "store", "chunks", "build s", "of it embedding s", "queries/s", "vs rank_bm25",
                         f"recall@{K}"], rows, caption)
    finally:
        if server is not None:
            server.cleanup()
    results["wall_s"] = time.perf_counter() - start
    log.print(f"total {results['wall_s']:.0f} s")
    save_json(args.out, {"argv": sys.argv[1:], "results": results})


if __name__ == "__main__":
    main()
