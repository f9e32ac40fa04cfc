"""SQL execution metrics: run gold and predicted SQL on a read-only SQLite database and compare results.

`sql_exec` scores 1.0 when the predicted query returns the same rows as the gold query: compared as a
multiset (duplicates count, order ignored), or as an ordered list when the gold query has a top-level
ORDER BY. Columns are compared by position; floats are rounded to 6 decimals so that equivalent
aggregates computed in a different order still match. `sql_valid` scores 1.0 when the prediction runs
and returns a result set, whatever the rows (the "execution success" rate).

The database is opened with a `file:...?mode=ro` URI and ATTACH is refused, so a prediction cannot
change anything. Each query runs under a wall-clock timeout enforced by a progress-handler interrupt
(default 5 s). A prediction that is empty, errors or times out scores 0 and the error is the detail;
a gold query that fails raises TunelabError, because the task is broken rather than the model.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.evaluate.metrics.base import MetricResult

DEFAULT_TIMEOUT_S = 5.0
_PROGRESS_EVERY = 1000  # SQLite VM instructions between deadline checks
_NOISE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|--[^\n]*|/\*.*?\*/", re.DOTALL)
_PARENS_AND_ORDER = re.compile(r"\(|\)|\border\s+by\b", re.IGNORECASE)


class QueryError(Exception):
    """A query that failed, timed out or returned no result set; the message is the reason."""


def has_top_level_order_by(sql: str) -> bool:
    """True when ORDER BY appears outside parentheses, strings and comments (so it orders the result)."""
    depth = 0
    for match in _PARENS_AND_ORDER.finditer(_NOISE.sub(" ", sql)):
        token = match.group(0)
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0:
            return True
    return False


def _deny_attach(action: int, *args) -> int:
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


def _cell(value):
    return round(value, 6) if isinstance(value, float) else value


def run_query(db: str | Path, sql: str, timeout: float = DEFAULT_TIMEOUT_S) -> list[tuple]:
    """Run one statement on the database opened read-only; raise QueryError with the reason on failure."""
    if not sql.strip():
        raise QueryError("empty SQL")
    conn = sqlite3.connect(Path(db).resolve().as_uri() + "?mode=ro", uri=True)
    deadline = time.monotonic() + timeout
    conn.set_authorizer(_deny_attach)
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_EVERY)
    try:
        cursor = conn.execute(sql)
        if cursor.description is None:
            raise QueryError("statement returned no result set (not a query)")
        return [tuple(_cell(v) for v in row) for row in cursor.fetchall()]
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as e:
        if isinstance(e, sqlite3.OperationalError) and "interrupted" in str(e):
            raise QueryError(f"timed out after {timeout:g} s") from None
        raise QueryError(str(e)) from None
    finally:
        conn.close()


@lru_cache(maxsize=4096)
def _gold_rows(db: str, mtime_ns: int, sql: str, timeout: float) -> tuple[tuple, ...]:
    try:
        return tuple(run_query(db, sql, timeout))
    except QueryError as e:
        raise TunelabError(
            f"The gold SQL fails on {db}: {e}. Query: {sql!r}. Fix the task's reference SQL or pass the "
            "database it was written for (--db)."
        ) from None


def gold_rows(db: str | Path, sql: str, timeout: float = DEFAULT_TIMEOUT_S) -> list[tuple]:
    """The gold query's rows (cached per database file version); TunelabError if the gold query fails."""
    path = Path(db).resolve()
    if not path.is_file():
        raise TunelabError(f"The SQLite database {db} does not exist. Pass an existing file with --db.")
    return list(_gold_rows(str(path), path.stat().st_mtime_ns, sql, timeout))


def sql_exec_result(output: str, reference: str, *, db: str | Path, timeout: float = DEFAULT_TIMEOUT_S) -> MetricResult:
    """sql_exec with the reason for a 0 as detail (query error, timeout, or how the rows differ)."""
    gold = gold_rows(db, reference, timeout)
    try:
        pred = run_query(db, output, timeout)
    except QueryError as e:
        return MetricResult(0.0, str(e))
    if has_top_level_order_by(reference):
        if pred == gold:
            return MetricResult(1.0)
        if Counter(pred) == Counter(gold):
            return MetricResult(0.0, "right rows in the wrong order (the gold query has ORDER BY)")
    elif Counter(pred) == Counter(gold):
        return MetricResult(1.0)
    return MetricResult(0.0, f"wrong result: {len(pred)} rows, expected {len(gold)}")


def sql_valid_result(output: str, reference: str | None = None, *, db: str | Path,
                     timeout: float = DEFAULT_TIMEOUT_S) -> MetricResult:
    """sql_valid with the query error as detail."""
    try:
        run_query(db, output, timeout)
    except QueryError as e:
        return MetricResult(0.0, str(e))
    return MetricResult(1.0)


def sql_exec(output: str, reference: str, *, db: str | Path, timeout: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the predicted SQL returns the gold query's rows (multiset; ordered if gold has ORDER BY)."""
    return sql_exec_result(output, reference, db=db, timeout=timeout).score


def sql_valid(output: str, reference: str | None = None, *, db: str | Path,
              timeout: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the predicted SQL runs on the database (read-only, within the timeout) and returns rows."""
    return sql_valid_result(output, reference, db=db, timeout=timeout).score
