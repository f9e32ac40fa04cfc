"""The request log: one row per served request (the OpenTelemetry GenAI fields plus tenant, adapter, version and
outcome) and the feedback on it, in one store: a SQLite file (WAL) or PostgreSQL (several replicas).

`RequestLog.write` commits a batch in one transaction (all rows or none); the server calls it from a background
writer (tunelab.ops.logwriter), never from a request. `rows` returns LogRows oldest first. `feedback` returns
dicts joined with the response they rate, with these keys: response_id, tenant, ts (when the feedback came),
name, score, label, explanation, correction, and the response's model, adapter, version, outcome, response_ts.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tunelab.errors import TunelabError

FEEDBACK_NAME = "user_feedback"  # gen_ai.evaluation.name of what POST /v1/feedback stores
OUTCOMES = ("ok", "length_closed", "resampled", "blocked", "error")


@dataclass
class LogRow:
    """One served request. `prompt` and `answer` are set only for tenants whose keys.yaml entry says
    `log: content`, and are redacted before they are stored."""

    response_id: str  # gen_ai.response.id (the completion's id, "chatcmpl-...")
    ts: float  # unix seconds at request start
    tenant: str
    model: str  # gen_ai.request.model: what the client asked for (e.g. "orders", an alias)
    adapter: str | None = None  # the adapter actually served (e.g. "orders@v2"); None = the base
    version: str | None = None  # "v2" when `model` was an alias, else None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"  # gen_ai.response.finish_reasons[0]: stop | length | ...
    outcome: str = "ok"  # one of OUTCOMES
    latency_s: float = 0.0
    ttft_s: float | None = None
    grammar: str | None = None  # "json_schema:<sha256[:12]>" | "json_object" | None
    flags: list[str] = field(default_factory=list)  # output-check names that flagged
    user: str | None = None  # sha256 hex of the request's `user` field, if any
    prompt: str | None = None  # JSON of the messages (content logging only, redacted)
    answer: str | None = None  # the answer text (content logging only, redacted)
    prompt_version: str | None = None  # tunelab.ops.prompts version of the system prompt it ran with; None: none


_FIELDS = [f.name for f in fields(LogRow)]
_COLUMNS = [("user_hash" if n == "user" else n) for n in _FIELDS] + ["nbytes"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS request_log (
  response_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, tenant TEXT NOT NULL, model TEXT NOT NULL,
  adapter TEXT, version TEXT, temperature DOUBLE PRECISION, max_tokens INTEGER, top_p DOUBLE PRECISION,
  seed BIGINT, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, finish_reason TEXT NOT NULL,
  outcome TEXT NOT NULL, latency_s DOUBLE PRECISION NOT NULL, ttft_s DOUBLE PRECISION, grammar TEXT,
  flags TEXT NOT NULL, user_hash TEXT, prompt TEXT, answer TEXT, prompt_version TEXT, nbytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS request_log_ts ON request_log (ts);
CREATE INDEX IF NOT EXISTS request_log_tenant_ts ON request_log (tenant, ts);
CREATE INDEX IF NOT EXISTS request_log_model_ts ON request_log (model, ts);
CREATE INDEX IF NOT EXISTS request_log_adapter_ts ON request_log (adapter, ts);
CREATE TABLE IF NOT EXISTS request_feedback (
  id {autoid}, response_id TEXT NOT NULL, tenant TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, name TEXT NOT NULL,
  score DOUBLE PRECISION, label TEXT, explanation TEXT, correction TEXT);
CREATE INDEX IF NOT EXISTS request_feedback_response ON request_feedback (response_id);
"""
_ADDED = [("prompt_version", "TEXT")]  # columns newer than some stores: added to a log written before them


def default_path() -> Path:
    """The SQLite file beside the run registry: requests.sqlite."""
    from tunelab.runs.registry import registry_path

    return registry_path().parent / "requests.sqlite"


def _is_pg(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class RequestLog:
    """One store, SQLite (WAL) or PostgreSQL; safe to share between threads (one connection behind a lock)."""

    def __init__(self, url: str, conn, pg: bool):
        self.url, self._conn, self.pg = url, conn, pg
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str | Path | None = None) -> RequestLog:
        """None: requests.sqlite beside the registry; a path or `sqlite:///path`; or `postgresql://...`."""
        if url is None:
            url = default_path()
        text = str(url)
        if _is_pg(text):
            log = cls(text, None, True)
            with log._lock:
                log._connect()
            return log
        path = Path(text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else text).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # a commit survives the process being killed
            conn.executescript(_SCHEMA.format(autoid="INTEGER PRIMARY KEY"))
            have = {r[1] for r in conn.execute("PRAGMA table_info(request_log)")}
            for col, kind in _ADDED:
                if col not in have:
                    try:
                        conn.execute(f"ALTER TABLE request_log ADD COLUMN {col} {kind}")
                    except sqlite3.OperationalError as e:  # another process added it first
                        if "duplicate column" not in str(e):
                            raise
        except (OSError, sqlite3.DatabaseError) as e:
            raise TunelabError(f"--log {text}: cannot open the request log SQLite file ({e}); give a writable "
                               "path or a postgresql:// URL.") from None
        return cls(str(path), conn, False)

    def _connect(self) -> None:
        """(Re)connect to PostgreSQL and create the tables; call with the lock held."""
        try:
            import psycopg
        except ImportError:
            raise TunelabError("a postgresql:// request log needs psycopg: pip install 'tunelab[pg]'") from None
        try:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
            with self._conn.transaction():
                for stmt in _SCHEMA.format(autoid="BIGSERIAL PRIMARY KEY").split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                for col, kind in _ADDED:
                    self._conn.execute(f"ALTER TABLE request_log ADD COLUMN IF NOT EXISTS {col} {kind}")
        except psycopg.Error as e:
            self._conn = None
            raise TunelabError(f"--log {self.url}: cannot reach the PostgreSQL request log ({e}).") from None

    @contextmanager
    def _txn(self):
        """The connection inside one write transaction, under the lock; a PostgreSQL connection that fails is
        closed and reconnected at the next call."""
        with self._lock:
            if self.pg:
                if self._conn is None or self._conn.closed:
                    self._connect()
                try:
                    with self._conn.transaction():
                        yield _Pg(self._conn)
                except Exception as e:
                    if not isinstance(e, TunelabError):  # a connection error can leave it mid-pipeline: start anew
                        self._conn.close()
                        self._conn = None
                    raise
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: list) -> list[tuple]:
        with self._txn() as c:
            return list(c.execute(sql, params).fetchall())

    def write(self, rows: list[LogRow]) -> None:
        """Insert `rows` in one transaction: all of them or none. A response id already logged is kept as it
        was (a retried batch writes nothing twice). Raises when the store is down; the writer counts the drop."""
        if not rows:
            return
        values = [_values(r) for r in rows]
        cols = ", ".join(_COLUMNS)
        sql = (f"INSERT INTO request_log ({cols}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
               "ON CONFLICT (response_id) DO NOTHING")
        with self._txn() as c:
            c.executemany(sql, values)

    def rows(self, *, tenant: str | None = None, model: str | None = None, adapter: str | None = None,
             since: float | None = None, until: float | None = None, limit: int | None = None) -> list[LogRow]:
        """Rows oldest first, filtered by tenant, requested model, served adapter and [since, until) on ts;
        with `limit`, the newest `limit` of them."""
        where, params = _where(tenant=tenant, model=model, adapter=adapter, since=since, until=until)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM request_log{where} ORDER BY ts DESC, response_id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_row(t) for t in reversed(self._query(sql, params))]

    def get(self, response_id: str) -> LogRow | None:
        """The row of one response, or None."""
        where, params = _where(response_id=response_id)
        found = self._query(f"SELECT {', '.join(_COLUMNS)} FROM request_log{where}", params)
        return _row(found[0]) if found else None

    def count(self, *, tenant: str | None = None) -> int:
        where, params = _where(tenant=tenant)
        return self._query(f"SELECT COUNT(*) FROM request_log{where}", params)[0][0]

    def add_feedback(self, response_id: str, tenant: str | None, *, score: float | None = None,
                     label: str | None = None, comment: str | None = None, correction: str | None = None,
                     name: str = FEEDBACK_NAME) -> bool:
        """Store feedback on `response_id` (OTel gen_ai.evaluation.result: name, score value, label,
        explanation = the comment; plus a correction). False when no such response is `tenant`'s (None: any
        tenant's, for admins)."""
        if score is None and label is None:
            raise TunelabError("feedback needs a score or a label (or both).")
        where, params = _where(response_id=response_id, tenant=tenant)
        with self._txn() as c:
            found = c.execute(f"SELECT tenant FROM request_log{where}", params).fetchall()
            if not found:
                return False
            c.execute("INSERT INTO request_feedback (response_id, tenant, ts, name, score, label, explanation, "
                      "correction) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      [response_id, found[0][0], time.time(), name, score, label, comment, correction])
        return True

    def feedback(self, *, tenant: str | None = None, model: str | None = None, adapter: str | None = None,
                 since: float | None = None) -> list[dict]:
        """Feedback oldest first, each joined with the response it rates (keys in the module docstring)."""
        where, params = _where(prefix="r.", tenant=tenant, model=model, adapter=adapter)
        if since is not None:
            where += (" AND" if where else " WHERE") + " f.ts >= ?"
            params.append(since)
        sql = ("SELECT f.response_id, f.tenant, f.ts, f.name, f.score, f.label, f.explanation, f.correction, "
               "r.model, r.adapter, r.version, r.outcome, r.ts FROM request_feedback f JOIN request_log r ON "
               f"r.response_id = f.response_id{where} ORDER BY f.ts, f.id")
        keys = ("response_id", "tenant", "ts", "name", "score", "label", "explanation", "correction", "model",
                "adapter", "version", "outcome", "response_ts")
        return [dict(zip(keys, t)) for t in self._query(sql, params)]

    def prune(self, *, max_age_s: float | None = None, max_bytes: int | None = None,
              now: float | None = None) -> int:
        """Retention: delete rows older than `max_age_s`, then the oldest rows until the rest hold at most
        `max_bytes` (the rows' own sizes), with their feedback. Returns the number of rows deleted."""
        deleted = 0
        with self._txn() as c:
            if max_age_s is not None:
                cut = (time.time() if now is None else now) - max_age_s
                deleted += _delete_before(c, cut, inclusive=False)
            if max_bytes is not None:
                total = c.execute("SELECT COALESCE(SUM(nbytes), 0) FROM request_log").fetchone()[0]
                if total > max_bytes:
                    over, cut = total - max_bytes, None
                    for ts, n in c.execute("SELECT ts, nbytes FROM request_log ORDER BY ts").fetchall():
                        over -= n
                        cut = ts
                        if over <= 0:
                            break
                    deleted += _delete_before(c, cut, inclusive=True)
        return deleted

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _Pg:
    """psycopg's connection behind sqlite3's "?" placeholders."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: list) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)


def _delete_before(c, ts: float, inclusive: bool) -> int:
    op = "<=" if inclusive else "<"
    c.execute(f"DELETE FROM request_feedback WHERE response_id IN (SELECT response_id FROM request_log "
              f"WHERE ts {op} ?)", [ts])
    return c.execute(f"DELETE FROM request_log WHERE ts {op} ?", [ts]).rowcount


def _where(prefix: str = "", **equal) -> tuple[str, list]:
    since, until = equal.pop("since", None), equal.pop("until", None)
    clauses, params = [], []
    for col, value in equal.items():
        if value is not None:
            clauses.append(f"{prefix}{col} = ?")
            params.append(value)
    if since is not None:
        clauses.append(f"{prefix}ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append(f"{prefix}ts < ?")
        params.append(until)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _values(r: LogRow) -> list:
    d = asdict(r)
    d["flags"] = json.dumps(list(r.flags))
    values = [d[n] for n in _FIELDS]
    values.append(200 + len(r.prompt or "") + len(r.answer or ""))  # nbytes: about what the row takes
    return values


def _row(t: tuple) -> LogRow:
    d = dict(zip(_FIELDS, t[:-1]))
    d["flags"] = json.loads(d["flags"])
    return LogRow(**d)


def attributes(row: LogRow) -> dict:
    """The row as OpenTelemetry GenAI semantic-convention attributes (tunelab.* for what they do not name)."""
    op = "chat" if row.response_id.startswith("chatcmpl") else "text_completion"
    a = {"gen_ai.operation.name": op, "gen_ai.provider.name": "tunelab", "gen_ai.request.model": row.model,
         "gen_ai.request.temperature": row.temperature, "gen_ai.request.max_tokens": row.max_tokens,
         "gen_ai.request.top_p": row.top_p, "gen_ai.request.seed": row.seed, "gen_ai.response.id": row.response_id,
         "gen_ai.response.model": row.adapter or row.model, "gen_ai.response.finish_reasons": [row.finish_reason],
         "gen_ai.usage.input_tokens": row.input_tokens, "gen_ai.usage.output_tokens": row.output_tokens,
         "gen_ai.output.type": "json" if row.grammar else "text", "gen_ai.input.messages": row.prompt,
         "gen_ai.output.messages": row.answer, "tunelab.tenant": row.tenant, "tunelab.adapter": row.adapter,
         "tunelab.version": row.version, "tunelab.outcome": row.outcome, "tunelab.latency_s": row.latency_s,
         "tunelab.ttft_s": row.ttft_s, "tunelab.grammar": row.grammar, "tunelab.flags": list(row.flags),
         "tunelab.user_sha256": row.user, "tunelab.prompt_version": row.prompt_version, "tunelab.ts": row.ts}
    return {k: v for k, v in a.items() if v is not None}


def evaluation(fb: dict) -> dict:
    """A feedback dict as the attributes of OTel's gen_ai.evaluation.result event."""
    a = {"gen_ai.response.id": fb["response_id"], "gen_ai.evaluation.name": fb["name"],
         "gen_ai.evaluation.score.value": fb["score"], "gen_ai.evaluation.score.label": fb["label"],
         "gen_ai.evaluation.explanation": fb["explanation"], "tunelab.correction": fb["correction"],
         "tunelab.tenant": fb["tenant"]}
    return {k: v for k, v in a.items() if v is not None}
