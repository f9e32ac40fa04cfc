"""Where an index keeps its chunks and vectors: the Store protocol and the embedded store (files in the index
folder: chunks.jsonl, embeddings.npy, bm25/). PostgreSQL + pgvector is tunelab.rag.pg."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from tunelab.rag.corpus import Chunk
from tunelab.rag.lexical import Bm25
from tunelab.runs.layout import read_jsonl, write_jsonl

CHUNKS_JSONL = "chunks.jsonl"
EMBEDDINGS_NPY = "embeddings.npy"
BM25_DIR = "bm25"

Ranking = list[tuple[str, float]]  # (chunk id, score), best first


class Store(Protocol):
    """Chunks plus the two retrievers over them; each returns the top-n chunk ids per query, best first."""

    lexical_name: str  # what the lexical retriever's scores are (a key of tunelab.rag.index.SCORE_MEANINGS)

    def dense(self, vecs: np.ndarray, n: int) -> list[Ranking]: ...

    def lexical(self, queries: list[str], n: int) -> list[Ranking]: ...

    def chunks(self, ids: list[str]) -> dict[str, Chunk]: ...


class EmbeddedStore:
    """Exact cosine search over a float32 matrix and bm25s, all loaded into memory from the index folder."""

    lexical_name = "bm25"

    def __init__(self, chunks: list[Chunk], vecs: np.ndarray | None, bm25: Bm25 | None):
        self.rows = chunks
        self.by_id = {c.id: c for c in chunks}
        self.vecs, self.bm25 = vecs, bm25

    @staticmethod
    def write(folder: Path, chunks: list[Chunk], vecs: np.ndarray | None, bm25: Bm25 | None) -> None:
        write_jsonl(folder / CHUNKS_JSONL, [c.to_json() for c in chunks])
        if vecs is not None:
            with open(folder / EMBEDDINGS_NPY, "wb") as f:  # folder is the build's temp folder
                np.save(f, vecs, allow_pickle=False)
        if bm25 is not None:
            bm25.save(folder / BM25_DIR)

    @classmethod
    def open(cls, folder: Path, stemmer: str | None) -> EmbeddedStore:
        chunks = [Chunk(**row) for row in read_jsonl(folder / CHUNKS_JSONL)]
        vecs = np.load(folder / EMBEDDINGS_NPY) if (folder / EMBEDDINGS_NPY).is_file() else None
        bm25 = Bm25.load(folder / BM25_DIR, stemmer, len(chunks)) if (folder / BM25_DIR).is_dir() else None
        return cls(chunks, vecs, bm25)

    def dense(self, vecs: np.ndarray, n: int) -> list[Ranking]:
        sims = vecs @ self.vecs.T  # (Q, N): cosine, both sides are unit length
        n = min(n, sims.shape[1])
        top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        out = []
        for q, cand in enumerate(top):
            order = sorted(cand.tolist(), key=lambda r: (-sims[q, r], r))
            out.append([(self.rows[r].id, float(sims[q, r])) for r in order])
        return out

    def lexical(self, queries: list[str], n: int) -> list[Ranking]:
        return [[(self.rows[r].id, s) for r, s in hits] for hits in self.bm25.search_many(queries, n)]

    def chunks(self, ids: list[str]) -> dict[str, Chunk]:
        return {i: self.by_id[i] for i in ids}
