"""The scale-out store: chunks and embeddings in PostgreSQL, dense search with pgvector (HNSW, cosine) and the
lexical side with PostgreSQL full-text search; the index fuses the two the same way as the embedded store.

One table per index version, named from the index key, so a new corpus or embedder never overwrites the rows
an older version reads. The table's comment holds the key; opening a table whose key differs is refused.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from tunelab.errors import TunelabError
from tunelab.rag.corpus import Chunk
from tunelab.rag.store import Ranking

TS_CONFIG = "english"
# the query's lexemes OR-ed (plainto_tsquery ANDs them, and a question rarely shares every word with its passage)
_ANY_TERM = "replace(plainto_tsquery('english', %s)::text, ' & ', ' | ')::tsquery"


def public_uri(uri: str) -> str:
    """The URI without its password: what the index.json records (give the password again through PGPASSWORD
    or `load_index(store=...)`)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + "@"
    return urlunsplit(parts._replace(netloc=user + netloc[-1]))


def table_name(key: str) -> str:
    return f"tunelab_rag_{key[:16]}"


def _connect(uri: str):
    try:
        import psycopg
    except ImportError:
        raise TunelabError("--store postgresql://... needs the pg extra: pip install 'tunelab[pg]'.") from None
    try:
        return psycopg.connect(uri, autocommit=True)
    except psycopg.OperationalError as e:
        raise TunelabError(f"cannot connect to {public_uri(uri)}: {str(e).strip()}") from None


def _vector(v: np.ndarray) -> str:
    # 9 significant digits name every float32 exactly (pgvector parses them back with strtof); one C-level
    # format per vector is 2.5x faster than repr() per number, which COPY of 100k vectors feels
    return ("[" + ",".join(["%.9g"] * len(v)) + "]") % tuple(v.tolist())


def _hnsw_build_mib(vecs: np.ndarray) -> int:
    """maintenance_work_mem for building the HNSW graph of `vecs` in memory: the vector and ~1 KiB of neighbour
    lists (m = 16: 32 on layer 0) per row, with half again for slack; never below PostgreSQL's 64 MB default."""
    n, dim = vecs.shape
    return max(64, int(n * (4 * dim + 1024) * 1.5 / 2**20) + 1)


class PgStore:
    """Chunks of one index version in table `table` of the database at `uri`."""

    lexical_name = "full-text"  # ts_rank over a tsvector, not BM25

    def __init__(self, uri: str, table: str, key: str, ef_search: int = 200, exact: bool = False):
        self.uri, self.table, self.ef_search, self.exact = uri, table, ef_search, exact
        self.conn = _connect(uri)
        found = self.conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (table,)).fetchone()
        if found is None or found[0] is None:
            raise TunelabError(f"{public_uri(uri)} has no table {table}: the index's rows are gone; rebuild it "
                               "with `tunelab rag index ... --store URI`.")
        if found[0] != key:
            raise TunelabError(f"table {table} in {public_uri(uri)} holds index {found[0][:12]}, not {key[:12]}; "
                               "rebuild the index.")

    @classmethod
    def write(cls, uri: str, key: str, chunks: list[Chunk], vecs: np.ndarray | None) -> str:
        """Create (or replace) the table of index `key` and fill it; returns the table name."""
        table = table_name(key)
        dim = vecs.shape[1] if vecs is not None else 1
        conn = _connect(uri)
        try:
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                conn.execute(f"DROP TABLE IF EXISTS {table}")
                conn.execute(
                    f"CREATE TABLE {table} (row integer PRIMARY KEY, id text UNIQUE NOT NULL, doc_id text NOT NULL, "
                    f"title text NOT NULL, text text NOT NULL, meta jsonb NOT NULL, embedding vector({dim}), "
                    f"tsv tsvector GENERATED ALWAYS AS (to_tsvector('{TS_CONFIG}', title || ' ' || text)) STORED)")
                with conn.cursor() as cur, cur.copy(
                        f"COPY {table} (row, id, doc_id, title, text, meta, embedding) FROM STDIN") as copy:
                    for i, c in enumerate(chunks):
                        vec = _vector(vecs[i]) if vecs is not None else None
                        copy.write_row((i, c.id, c.doc_id, c.title, c.text, json.dumps(c.meta), vec))
                if vecs is not None:
                    # pgvector builds the HNSW graph in memory while it fits in maintenance_work_mem (64 MB
                    # by default: ~25k 384-d vectors), then goes on on disk, many times slower
                    conn.execute(f"SET LOCAL maintenance_work_mem = '{_hnsw_build_mib(vecs)}MB'")
                    conn.execute(f"CREATE INDEX ON {table} USING hnsw (embedding vector_cosine_ops)")
                conn.execute(f"CREATE INDEX ON {table} USING gin (tsv)")
                conn.execute(f"COMMENT ON TABLE {table} IS '{key}'")
        finally:
            conn.close()
        return table

    def dense(self, vecs: np.ndarray, n: int) -> list[Ranking]:
        out = []
        with self.conn.transaction():
            # exact: a sequential scan in exact cosine order, ties by row as the embedded store breaks them (for
            # checks); else the HNSW index, which only serves a plain ORDER BY distance LIMIT n
            if self.exact:
                self.conn.execute("SET LOCAL enable_indexscan = off")
            else:
                self.conn.execute(f"SET LOCAL hnsw.ef_search = {max(self.ef_search, n)}")
            order = "embedding <=> %s::vector" + (", row" if self.exact else "")
            for v in vecs:
                q = _vector(v)
                rows = self.conn.execute(f"SELECT id, 1 - (embedding <=> %s::vector) FROM {self.table} "
                                         f"ORDER BY {order} LIMIT %s", (q, q, n)).fetchall()
                out.append([(i, float(s)) for i, s in rows])
        return out

    def lexical(self, queries: list[str], n: int) -> list[Ranking]:
        out = []
        for text in queries:
            rows = self.conn.execute(
                f"SELECT id, ts_rank(tsv, x.q, 1) AS score FROM {self.table}, (SELECT {_ANY_TERM} AS q) AS x "
                f"WHERE tsv @@ x.q ORDER BY score DESC, row LIMIT %s", (text, n)).fetchall()
            out.append([(i, float(s)) for i, s in rows])
        return out

    def chunks(self, ids: list[str]) -> dict[str, Chunk]:
        if not ids:
            return {}
        rows = self.conn.execute(f"SELECT id, doc_id, text, title, meta FROM {self.table} WHERE id = ANY(%s)",
                                 (list(ids),)).fetchall()
        return {r[0]: Chunk(r[0], r[1], r[2], r[3], r[4] or {}) for r in rows}

    def close(self) -> None:
        self.conn.close()
