"""Build, version, register and search a retrieval index (BM25, dense, or hybrid by reciprocal-rank fusion).

An index folder OUT holds one subfolder per version (v1, v2, ...) and an index.json naming the current one.
A version's key is the hash of everything that decides its content: the corpus content, the chunking, the
embedder's weights, the retrieval kind and the store. Building again with the same inputs rebuilds the same
version in place (same files); a changed corpus or embedder becomes the next version beside the old ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config.recipe import RagConfig
from tunelab.errors import TunelabError
from tunelab.rag.corpus import chunk_docs, read_corpus
from tunelab.rag.embed import DEFAULT_EMBEDDER, Embedder, embedder_identity, load_chunk_tokenizer
from tunelab.rag.lexical import Bm25
from tunelab.rag.rerank import CrossEncoderReranker, Reranker
from tunelab.rag.store import EmbeddedStore, Ranking, Store
from tunelab.runs import layout
from tunelab.runs.record import register_index

FORMAT = 1  # bump when a version folder's layout changes


# what each score name means, for readers of a result (`tunelab rag query` prints it under its table)
SCORE_MEANINGS = {
    "rrf": "reciprocal-rank fusion: each retriever adds 1 / ({rrf_k} + its rank), so {top:.4f} = first in both "
           "retrievers; only the order matters, not the size",
    "bm25": "BM25 keyword score: higher = more (and rarer) query words in the chunk; unbounded",
    "full-text": "PostgreSQL full-text rank (ts_rank) of the query words",
    "cosine": "cosine similarity of the query's and the chunk's embeddings, -1 to 1",
    "cross-encoder": "the cross-encoder's relevance logit for (query, chunk)",
    "judge": "the base model's log-odds of answering Yes to 'does the passage answer the question?' (> 0: yes)",
}


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk. `score` orders the list and is a `score_name` (a key of SCORE_MEANINGS); `stages`
    holds what each earlier stage said of the chunk: {"bm25" | "full-text" | "dense" | "rrf": {"rank", "score"}}
    (a retriever that did not return the chunk among its candidates is absent)."""

    id: str  # chunk id, "<doc_id>#<n>"
    doc_id: str
    text: str
    title: str
    score: float
    rank: int = 0  # 1 = best
    score_name: str = ""
    stages: dict = field(default_factory=dict)


@dataclass
class QueryResult:
    """`tunelab rag query`'s answer: the hits and what their scores mean (SCORE_MEANINGS, filled in)."""

    question: str
    kind: str
    hits: list[Hit]
    meanings: dict[str, str]


def rrf(rankings: list[Ranking], k: int = 60) -> Ranking:
    """Reciprocal-rank fusion: each list adds 1 / (k + rank) to an id (rank from 1); ties by id."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, (cid, _) in enumerate(ranking, 1):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


class RagIndex:
    """One version of an index: its manifest (index.json), store, and the embedder it was built with."""

    def __init__(self, folder: Path, manifest: dict, store: Store, embedder: Embedder | None = None,
                 reranker: Reranker | None = None):
        self.folder, self.manifest, self.store = folder, manifest, store
        self.config = RagConfig(**manifest["retrieval"])
        self._embedder, self.reranker = embedder, reranker

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def embedder(self) -> Embedder:
        """The embedder the index was built with, loaded on first use (checked by its weights hash)."""
        if self._embedder is None:
            built = self.manifest["embedder"]
            self._embedder = Embedder(_same_embedder(self.folder, built, built["path"]), self.config.embed_dtype)
        return self._embedder

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        """The k best chunks for `query` (k defaults to the index's retrieval.k)."""
        return self.search_many([query], k)[0]

    def with_reranker(self, reranker: Reranker | None) -> RagIndex:
        """This index searched with `reranker` (None: in fused order), sharing its store and embedder."""
        return RagIndex(self.folder, self.manifest, self.store, self._embedder, reranker)

    def search_many(self, queries: list[str], k: int | None = None) -> list[list[Hit]]:
        """search() for many queries at once (the embedder encodes them in batches, the reranker scores all
        queries' candidates in one call)."""
        k = k or self.config.k
        n = max(k, self.config.candidates) if (self.kind == "hybrid" or self.reranker) else k
        lists: dict[str, list[Ranking]] = {}
        if self.kind in ("bm25", "hybrid"):
            lists[self.store.lexical_name] = self.store.lexical(queries, n)
        if self.kind in ("dense", "hybrid"):
            lists["dense"] = self.store.dense(self.embedder.encode(queries), n)
        if len(lists) == 1:
            name, fused = next(iter(lists.items()))
            name = "cosine" if name == "dense" else name
        else:
            name, fused = "rrf", [rrf(list(per_query), self.config.rrf_k) for per_query in zip(*lists.values())]
        chunks = self.store.chunks(sorted({cid for ranking in fused for cid, _ in ranking}))
        out = []
        for q, ranking in enumerate(fused):
            own = {stage: {cid: {"rank": r, "score": s} for r, (cid, s) in enumerate(lists[stage][q], 1)}
                   for stage in lists}
            out.append([Hit(cid, chunks[cid].doc_id, chunks[cid].text, chunks[cid].title, s, r, name,
                            {stage: seen[cid] for stage, seen in own.items() if cid in seen})
                        for r, (cid, s) in enumerate(ranking, 1)])
        if self.reranker is not None:
            out = self._rerank(queries, out, k, chunks)
        return [hits[:k] for hits in out]

    def _rerank(self, queries: list[str], fused: list[list[Hit]], k: int, chunks) -> list[list[Hit]]:
        """The top `reranker.depth` (at least k) of each fused list, rescored and reordered by the reranker; the
        fused score and rank move into `stages` (as "rrf" for a hybrid index)."""
        depth = None if self.reranker.depth is None else max(k, self.reranker.depth)  # None: all
        tops = [hits[:depth] for hits in fused]
        pairs = [(query, chunks[h.id].indexed_text) for query, hits in zip(queries, tops) for h in hits]
        scores = iter(self.reranker.score(pairs))
        out = []
        for hits in tops:
            rescored = [(next(scores), h) for h in hits]
            rescored.sort(key=lambda sh: (-sh[0], sh[1].id))
            out.append([Hit(h.id, h.doc_id, h.text, h.title, s, r, self.reranker.name,
                            {**h.stages, h.score_name: {"rank": h.rank, "score": h.score}}
                            if h.score_name == "rrf" else h.stages)
                        for r, (s, h) in enumerate(rescored, 1)])
        return out

    def close(self) -> None:
        """Close the store's database connection, if it has one."""
        close = getattr(self.store, "close", None)
        if close is not None:
            close()


def _key(corpus_sha: str, cfg: RagConfig, chunker: dict, embedder: dict | None, store_kind: str,
         reranker: dict | None) -> str:
    build = {"format": FORMAT, "corpus": corpus_sha, "kind": cfg.kind, "chunk_tokens": cfg.chunk_tokens,
             "overlap": cfg.overlap, "chunk_tokenizer": chunker["sha256"], "stemmer": cfg.stemmer,
             "embedder": embedder["sha256"] if embedder else None, "store": store_kind, "reranker": reranker}
    if embedder and cfg.embed_dtype != "float32":
        build["embed_dtype"] = cfg.embed_dtype  # only when set, so float32 indexes keep the keys they had
    return hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()


def _versions(out: Path) -> dict:
    """The index folder's index.json ({"current", "versions": {name: key}}); {} for a new folder."""
    top = out / layout.INDEX_JSON
    if top.is_file():
        data = layout.read_json(top, "index manifest")
        if "versions" not in data:
            raise TunelabError(f"{out} is one version of an index (it has no versions list); give its parent "
                               "folder, or a new --out.")
        return data
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"{out} exists and is not a tunelab index (no {layout.INDEX_JSON}); choose another "
                           "--out, nothing was overwritten.")
    return {}


def build_index(corpus: str | Path, out: str | Path, kind: str | None = None, chunk_tokens: int | None = None,
                overlap: int | None = None, embedder: str | Path | None = None, store: str | None = None,
                stemmer: str | None = None, reranker: str | Path | None = None,
                embed_dtype: str | None = None) -> RagIndex:
    """Chunk `corpus` (JSONL, folder of .md/.txt, or task) and index it into a new version of `out`.

    kind: bm25 | dense | hybrid. chunk_tokens / overlap: window size and overlap in the embedder's tokens.
    embedder: a local sentence-transformers folder (default: the bundled all-MiniLM-L6-v2).
    store: None = files in the index folder; "postgresql://..." = PostgreSQL + pgvector.
    stemmer: BM25 stemmer language (PyStemmer). reranker: a local cross-encoder folder used at query time.
    embed_dtype: float32 | bfloat16, the embedder's compute dtype (recorded; queries use it too).
    Unset options take the defaults of tunelab.config.recipe.RagConfig.
    """
    given = {"kind": kind, "chunk_tokens": chunk_tokens, "overlap": overlap, "stemmer": stemmer,
             "embed_dtype": embed_dtype}
    try:
        cfg = RagConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise TunelabError(f"rag index options: {e}") from None
    if store is not None and not store.startswith(("postgresql://", "postgres://")):
        raise TunelabError(f"--store {store!r}: give a postgresql://... URI, or omit it for the embedded store.")
    out = Path(out).resolve()
    top = _versions(out)
    docs, source = read_corpus(corpus)
    chunker = embedder_identity(embedder)
    emb = Embedder(chunker, cfg.embed_dtype) if cfg.kind != "bm25" else None
    if emb is not None and cfg.chunk_tokens > emb.max_tokens:
        raise TunelabError(f"chunk_tokens={cfg.chunk_tokens} is more than the embedder reads ({emb.max_tokens} "
                           f"tokens): the rest of each chunk would be cut; pass --chunk-tokens {emb.max_tokens} "
                           "or less.")
    chunks = chunk_docs(docs, load_chunk_tokenizer(chunker["path"]), cfg.chunk_tokens, cfg.overlap)
    rr = CrossEncoderReranker(reranker) if reranker else None
    key = _key(source["sha256"], cfg, chunker, emb.identity if emb else None, "postgresql" if store else "embedded",
               rr.identity if rr else None)
    versions = top.get("versions", {})
    name = next((v for v, k in versions.items() if k == key), f"v{len(versions) + 1}")
    vecs = emb.encode([c.indexed_text for c in chunks]) if emb is not None else None

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    try:
        if store is None:
            bm25 = Bm25.build([c.indexed_text for c in chunks], cfg.stemmer) if cfg.kind != "dense" else None
            EmbeddedStore.write(tmp, chunks, vecs, bm25)
            opened: Store = EmbeddedStore(chunks, vecs, bm25)
            store_info = {"kind": "embedded"}
        else:
            from tunelab.rag.pg import PgStore, public_uri

            table = PgStore.write(store, key, chunks, vecs)
            opened = PgStore(store, table, key)
            store_info = {"kind": "postgresql", "uri": public_uri(store), "table": table}
        manifest = {
            "format": FORMAT, "version": name, "key": key, "retrieval": cfg.model_dump(),
            "corpus": source, "chunks": len(chunks),
            "chunking": {"tokens": cfg.chunk_tokens, "overlap": cfg.overlap, "tokenizer": chunker},
            "embedder": {**emb.identity, "dim": emb.dim, "dtype": emb.dtype} if emb else None,
            "reranker": rr.identity if rr else None, "store": store_info,
        }
        layout.write_manifest(tmp, "index", manifest)
        if (out / name).exists():
            shutil.rmtree(out / name)
        tmp.rename(out / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    layout.write_manifest(out, "index", {"current": name, "versions": {**versions, name: key}})
    register_index(out / name)  # warns, never raises: the index is written either way
    return RagIndex(out / name, manifest, opened, emb, rr)


def _version_folder(path: Path) -> tuple[Path, dict]:
    manifest = layout.read_json(path / layout.INDEX_JSON, "index.json `tunelab rag index` writes")
    if "current" in manifest:
        path = path / manifest["current"]
        manifest = layout.read_json(path / layout.INDEX_JSON, "index.json of the current version")
    if manifest.get("kind") != "index" or "retrieval" not in manifest:
        raise TunelabError(f"{path / layout.INDEX_JSON} is not a tunelab index manifest; rebuild the index.")
    return path, manifest


def _same_embedder(folder: Path, built: dict | None, spec: str | Path) -> dict:
    """The identity of embedder `spec`, refused unless its weights are those the index was built with."""
    asked = embedder_identity(spec)
    if built is None or asked["sha256"] != built["sha256"]:
        was = f"{built['spec']} (weights {built['sha256'][:12]})" if built else "no embedder (BM25 only)"
        raise TunelabError(f"{folder} was built with {was}; querying it with {asked['spec']} (weights "
                           f"{asked['sha256'][:12]}) would compare vectors of two different models "
                           "(embedding drift). Query without --embedder, or rebuild the index with this "
                           "embedder (it becomes a new version).")
    return {**built, "path": asked["path"]}


def load_index(path: str | Path, embedder: str | Path | None = None, store: str | None = None,
               reranker: str | Path | None = None, exact: bool = False) -> RagIndex:
    """Open an index folder (its current version) or one version folder (OUT/v2).

    embedder: the embedder you mean to query with; refused unless it is the one the index was built with
    (embedding drift: vectors from two models do not share a space). store: the PostgreSQL URI again when it
    carries a password the index did not record. reranker: a cross-encoder folder, overriding the recorded
    one. exact: PostgreSQL dense search by sequential scan instead of HNSW (for checks).
    """
    folder, manifest = _version_folder(Path(path).resolve())
    built = manifest.get("embedder")
    cfg = RagConfig(**manifest["retrieval"])
    emb = None
    if embedder is not None:
        emb = Embedder(_same_embedder(folder, built, embedder), cfg.embed_dtype)
    elif built is not None and not Path(built["path"]).is_dir():
        if built["spec"] != DEFAULT_EMBEDDER:
            raise TunelabError(f"{folder} was built with the embedder at {built['path']}, which is gone; pass "
                               "--embedder with the same model (checked by its weights hash).")
        # the package moved (a new venv)
        emb = Embedder(_same_embedder(folder, built, DEFAULT_EMBEDDER), cfg.embed_dtype)
    rr = reranker or (manifest.get("reranker") or {}).get("path")
    st = manifest["store"]
    if st["kind"] == "postgresql":
        from tunelab.rag.pg import PgStore

        opened: Store = PgStore(store or st["uri"], st["table"], manifest["key"], exact=exact)
    else:
        opened = EmbeddedStore.open(folder, cfg.stemmer)
    return RagIndex(folder, manifest, opened, emb, CrossEncoderReranker(rr) if rr else None)



def query_index(index: str | Path, question: str, k: int = 5, embedder: str | Path | None = None) -> QueryResult:
    """`tunelab rag query`: open the index (refusing a different embedder), search it once, and say what the
    scores mean."""
    idx = load_index(index, embedder=embedder)
    try:
        hits = idx.search(question, k)
    finally:
        idx.close()
    rrf_k = idx.config.rrf_k
    names = {h.score_name for h in hits} | {s for h in hits for s in h.stages}
    names = {"cosine" if n == "dense" else n for n in names}
    meanings = {n: SCORE_MEANINGS[n].format(rrf_k=rrf_k, top=2 / (rrf_k + 1)) for n in sorted(names)
                if n in SCORE_MEANINGS}
    return QueryResult(question, idx.kind, hits, meanings)
