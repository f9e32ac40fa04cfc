"""The SQLite registry: one WAL file under $TUNELAB_HOME, versioned migrations, artifact rows and edges.

Every artifact (dataset, prompt, recipe, base model, run, adapter, eval, merge, export, index, ladder) is one
row of `artifacts`, keyed by (kind, key): a content hash for datasets, prompts, recipes and base models, the
resolved folder path for everything written to a folder. `edges` says what each row was made from
(child -> parent, with a role such as base_model / train / recipe / adapter), so lineage is a graph query
(tunelab.runs.lineage). Per-kind views (datasets, prompts, base_models, runs, adapters, evals, indexes) show the
typed columns.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from tunelab.config.paths import tunelab_home
from tunelab.errors import TunelabError
from tunelab.runs.layout import INDEX_JSON

REGISTRY_ENV = "TUNELAB_REGISTRY"
BUSY_TIMEOUT_MS = 60_000

_VIEWS = """
CREATE VIEW IF NOT EXISTS datasets AS SELECT id, hash AS sha256, path, json_extract(meta, '$.rows') AS rows,
  created_at FROM artifacts WHERE kind = 'dataset';
CREATE VIEW IF NOT EXISTS prompts AS SELECT id, hash AS sha256, name AS role, json_extract(meta, '$.text') AS text,
  created_at FROM artifacts WHERE kind = 'prompt';
CREATE VIEW IF NOT EXISTS base_models AS SELECT id, name AS spec, hash, path, json_extract(meta, '$.license')
  AS license, created_at FROM artifacts WHERE kind = 'base_model';
CREATE VIEW IF NOT EXISTS runs AS SELECT id, path, json_extract(meta, '$.method') AS method,
  json_extract(meta, '$.metrics.steps') AS steps, json_extract(meta, '$.metrics.final_val_loss') AS final_val_loss,
  created_at FROM artifacts WHERE kind = 'run';
CREATE VIEW IF NOT EXISTS adapters AS SELECT id, kind, path, hash, created_at FROM artifacts
  WHERE kind IN ('adapter', 'model');
CREATE VIEW IF NOT EXISTS evals AS SELECT id, path, json_extract(meta, '$.task') AS task,
  json_extract(meta, '$.split') AS split, json_extract(meta, '$.primary_metric') AS primary_metric,
  json_extract(meta, '$.primary_score') AS primary_score, created_at FROM artifacts WHERE kind = 'eval';
"""

# Ordered schema steps: the database's `PRAGMA user_version` is how many have run. Append, never edit.
MIGRATIONS: list[str] = [
    # v1: artifacts with a JSON meta column, and lineage edges
    """
    CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        path TEXT,
        meta TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        UNIQUE (kind, key)
    );
    CREATE TABLE edges (
        child INTEGER NOT NULL REFERENCES artifacts(id) ON DELETE CASCADE,
        parent INTEGER NOT NULL REFERENCES artifacts(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        PRIMARY KEY (child, parent, role)
    );
    """,
    # v2: a display name and content hash as columns (backfilled from meta), the reverse-edge index for
    # depends-on, an update time, and per-kind views
    """
    ALTER TABLE artifacts ADD COLUMN name TEXT;
    ALTER TABLE artifacts ADD COLUMN hash TEXT;
    ALTER TABLE artifacts ADD COLUMN updated_at TEXT;
    UPDATE artifacts SET hash = json_extract(meta, '$.hash'), name = json_extract(meta, '$.name');
    CREATE INDEX edges_parent ON edges (parent);
    CREATE INDEX artifacts_hash ON artifacts (hash);
    """ + _VIEWS,
    # v3: the indexes view (retrieval indexes: one row per version folder, hash = the build key)
    """
    CREATE VIEW IF NOT EXISTS indexes AS SELECT id, path, hash AS key, json_extract(meta, '$.version') AS version,
      json_extract(meta, '$.retrieval') AS retrieval, json_extract(meta, '$.embedder') AS embedder,
      json_extract(meta, '$.corpus_sha256') AS corpus_sha256, json_extract(meta, '$.chunks') AS chunks,
      json_extract(meta, '$.store') AS store, created_at FROM artifacts WHERE kind = 'index';
    """,
    # v4: canary rollouts (tunelab.ops.rollout): each alias's version weights now, and every change to them
    # (which version served when); each change is also a `rollout` artifact, linked to the adapters it serves
    """
    CREATE TABLE rollouts (
        alias TEXT PRIMARY KEY,
        weights TEXT NOT NULL,
        stable TEXT NOT NULL,
        root TEXT,
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE rollout_events (
        id INTEGER PRIMARY KEY,
        alias TEXT NOT NULL,
        action TEXT NOT NULL,
        weights TEXT NOT NULL,
        previous TEXT,
        stable TEXT NOT NULL,
        actor TEXT,
        at REAL NOT NULL,
        artifact INTEGER REFERENCES artifacts(id) ON DELETE SET NULL
    );
    CREATE INDEX rollout_events_alias ON rollout_events (alias, at);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def registry_path() -> Path:
    """$TUNELAB_REGISTRY when set, else $TUNELAB_HOME/registry.sqlite."""
    env = os.environ.get(REGISTRY_ENV)
    return Path(env).expanduser() if env else tunelab_home() / "registry.sqlite"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def write_txn(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so concurrent writers queue, not fail."""
    for attempt in range(20):
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as e:  # busy_timeout exceeded under heavy contention
            if "locked" not in str(e) or attempt == 19:
                raise
            time.sleep(0.05 * (attempt + 1))
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _bad_file(path: Path, e: Exception) -> TunelabError:
    return TunelabError(f"{path} is not a tunelab registry SQLite database ({e}). Move it aside (the next "
                        f"command creates a fresh one) or point {REGISTRY_ENV} at another file.")


def migrate(conn: sqlite3.Connection, path: Path | str = "registry") -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found before. A newer schema is an error."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return SCHEMA_VERSION  # the common case: no write lock needed
    with write_txn(conn):  # re-read the version under the lock: two processes may migrate at once
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise TunelabError(f"{path} has registry schema v{found}, newer than this tunelab knows "
                               f"(v{SCHEMA_VERSION}): upgrade tunelab, or point {REGISTRY_ENV} at another file.")
        for version in range(found, SCHEMA_VERSION):
            for stmt in _statements(MIGRATIONS[version]):
                conn.execute(stmt)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return found


def _statements(script: str) -> list[str]:
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return [s for s in out if s.strip(" ;\n")]


def connect(path: str | Path | None = None) -> sqlite3.Connection:
    """Open (creating or migrating as needed) the registry; WAL, a busy timeout, foreign keys on."""
    path = Path(path) if path is not None else registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        migrate(conn, path)
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise TunelabError(f"{path} stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s; "
                               "retry when it finishes.") from None
        raise _bad_file(path, e) from None
    return conn


def upsert(conn: sqlite3.Connection, kind: str, key: str, *, name: str | None = None, path: str | None = None,
           hash: str | None = None, meta: dict | None = None) -> int:
    """Insert or update the (kind, key) row; returns its id. Call inside write_txn. On update, `meta` is
    merged into the stored meta (keys given win; None values are left out and never erase a known value)."""
    stamp = now()
    meta_json = json.dumps({k: v for k, v in (meta or {}).items() if v is not None}, sort_keys=True, default=str)
    conn.execute(
        "INSERT INTO artifacts (kind, key, name, path, hash, meta, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, key) DO UPDATE SET "
        "name = COALESCE(excluded.name, name), path = COALESCE(excluded.path, path), "
        "hash = COALESCE(excluded.hash, hash), meta = json_patch(meta, excluded.meta), updated_at = excluded.updated_at",
        (kind, key, name, path, hash, meta_json, stamp, stamp))
    return conn.execute("SELECT id FROM artifacts WHERE kind = ? AND key = ?", (kind, key)).fetchone()[0]


def link(conn: sqlite3.Connection, child: int, parents: dict[str, int | None] | list[tuple[str, int]]) -> None:
    """Replace `child`'s edges with role -> parent id (None parents are skipped). Call inside write_txn."""
    items = parents.items() if isinstance(parents, dict) else parents
    conn.execute("DELETE FROM edges WHERE child = ?", (child,))
    conn.executemany("INSERT OR IGNORE INTO edges (child, parent, role) VALUES (?, ?, ?)",
                     [(child, pid, role) for role, pid in items if pid is not None])


def row_dict(row: sqlite3.Row) -> dict:
    """An artifacts row as a plain dict with `meta` parsed."""
    d = dict(row)
    if isinstance(d.get("meta"), str):
        d["meta"] = json.loads(d["meta"])
    return d


def _current_version(folder: Path) -> Path | None:
    """The version folder (v1, v2, ...) an index folder's index.json names as current; None for any other path."""
    manifest = folder / INDEX_JSON
    try:
        current = json.loads(manifest.read_text(encoding="utf-8")).get("current") if manifest.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return (folder / current).resolve() if isinstance(current, str) else None


def find(conn: sqlite3.Connection, ref: str | int, kinds: tuple[str, ...] | None = None) -> dict:
    """The artifact a user means by `ref`: an id, a folder path (an index folder: its current version), a
    key/hash (or its prefix), or a name."""
    where = f" AND kind IN ({','.join('?' * len(kinds))})" if kinds else ""
    args = list(kinds or ())
    text = str(ref)
    candidates: list[tuple[str, list]] = []
    if text.isdigit():
        candidates.append(("id = ?", [int(text)]))
    p = Path(text).expanduser()
    candidates.append(("path = ?", [str(p.resolve())]))
    current = _current_version(p)
    if current is not None:  # an index folder stands for its current version (the rows are per version)
        candidates.append(("path = ?", [str(current)]))
    candidates += [("key = ?", [text]), ("hash = ?", [text]), ("name = ?", [text])]
    if len(text) >= 6:
        candidates.append(("(key LIKE ? OR hash LIKE ?)", [text + "%", text + "%"]))
    for cond, vals in candidates:
        rows = conn.execute(f"SELECT * FROM artifacts WHERE {cond}{where} ORDER BY id DESC", vals + args).fetchall()
        if rows:
            return row_dict(rows[0])
    what = "/".join(kinds) if kinds else "artifact"
    raise TunelabError(f"no {what} {text!r} in the registry {registry_path()}: give an id, folder or hash "
                       "from `tunelab runs list`.")
