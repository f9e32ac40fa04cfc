"""Score outputs against references with named metrics: per example, mean with a bootstrap CI, and from files."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import Metric, check_inputs
from tunelab.evaluate.metrics.structured import reference_value
from tunelab.evaluate.metrics.text import compile_pattern

_CHUNK = 2_000_000  # resampled values held in memory at once by bootstrap_ci


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean: resample with replacement, take quantiles.

    values: per-example scores. n_resamples: bootstrap samples. seed: numpy Generator seed, so the same
    values always give the same interval. alpha: 0.05 gives the 95% interval (2.5th, 97.5th percentiles).
    """
    x = np.asarray(values, dtype=float)  # (N,)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)  # (R,)
    rows = max(1, _CHUNK // x.size)
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))  # (r, N)
        means[start:stop] = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


GROUP_FIELDS = ("fact_in_train",)  # example fields that split an eval's scores into groups (handbook-qa)


def group_scores(examples: Sequence[dict], per_example: Sequence[dict]) -> dict:
    """Scores per group of examples: {field: {str(value): {metric: {score, ci95, n}}}} for every field of
    GROUP_FIELDS that the examples carry (none: {}). per_example: each example's {metric: value}."""
    out: dict = {}
    for name in GROUP_FIELDS:
        if not any(name in ex for ex in examples):
            continue
        groups: dict = {}
        for value in sorted({str(ex.get(name)).lower() for ex in examples}):
            idx = [i for i, ex in enumerate(examples) if str(ex.get(name)).lower() == value]
            groups[value] = {}
            for metric, first in per_example[idx[0]].items():
                if isinstance(first, float):  # scores, not explanations
                    vals = [float(per_example[i][metric]) for i in idx]
                    groups[value][metric] = {"score": float(np.mean(vals)), "ci95": list(bootstrap_ci(vals)),
                                             "n": len(vals)}
        out[name] = groups
    return out


def load_schema(path: str | Path) -> dict:
    """Read a JSON Schema file and check it is a valid Draft 2020-12 schema (TunelabError naming the problem)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"The schema file {path} does not exist. Pass a JSON Schema file with --schema.")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TunelabError(f"{path} is not valid JSON ({e}); --schema expects a JSON Schema file.") from None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise TunelabError(f"{path} is not a valid JSON Schema (Draft 2020-12) at {where}: {e.message}. "
                           "Fix that keyword; see https://json-schema.org/draft/2020-12.") from None
    return schema


def check_db(path: str | Path) -> Path:
    """The path of an existing SQLite database (TunelabError when missing or not SQLite)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"The SQLite database {path} does not exist. Pass an existing file with --db.")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise TunelabError(f"{path} is not a readable SQLite database ({e}). Pass a .sqlite file with --db.") from None
    return path


def _check_reference(metric: Metric, reference: Any, where: str) -> None:
    """Raise TunelabError at `where` when the reference cannot serve this metric."""
    try:
        if metric.reference == "json":
            reference_value(reference)
        elif metric.reference in ("sql", "pattern"):
            if not isinstance(reference, str):
                raise ValueError(f"the reference must be a string, got {type(reference).__name__}")
            if metric.reference == "pattern":
                compile_pattern(reference)
    except (ValueError, re.error) as e:
        raise TunelabError(f"{where}: {e} (metric {metric.name!r} expects a {metric.reference} reference).") from None


def _inputs(metric: Metric, schema: dict | None, db: Path | None) -> dict[str, Any]:
    return {k: v for k, v in (("schema", schema), ("db", db)) if k in metric.needs}


def score_examples(
    metrics: list[str],
    outputs: list[str],
    references: list,
    schema: dict | str | Path | None = None,
    db: str | Path | None = None,
    options: dict[str, dict] | None = None,
    where: Sequence[str] | None = None,
    details: list[dict[str, str]] | None = None,
) -> tuple[list[dict[str, float]], dict[str, dict]]:
    """Score every output with every metric.

    metrics: registry names (see tunelab.evaluate.metrics.METRICS). outputs / references: aligned lists.
    schema: a JSON Schema dict or file (for schema_valid*). db: a SQLite file (for sql_*).
    options: extra keyword arguments per metric, e.g. {"exact_match": {"punctuation": True}}.
    where: a location per example for error messages (default "example i").
    details: when given (an empty list), receives per example {metric: why it failed} for every metric
    that explains its failures (parse error, schema path, SQL error, missing or wrong fields).
    Returns (per_example, summary): per_example[i] = {metric: score}; summary[metric] = {"score": mean,
    "ci95": [lo, hi], "n": N}, plus "corpus" (corpus-level score) for bleu and chrf.
    """
    if len(outputs) != len(references):
        raise TunelabError(f"{len(outputs)} outputs but {len(references)} references; they must pair up one to one.")
    if not outputs:
        raise TunelabError("There are no examples to score.")
    if schema is not None and not isinstance(schema, dict):
        schema = load_schema(schema)
    db = check_db(db) if db is not None else None
    entries = [check_inputs(name, schema=schema, db=db) for name in metrics]
    labels = list(where) if where is not None else [f"example {i}" for i in range(len(outputs))]
    for metric in entries:
        for ref, label in zip(references, labels):
            _check_reference(metric, ref, label)

    per_example: list[dict[str, float]] = [{} for _ in outputs]
    summary: dict[str, dict] = {}
    for metric in entries:
        kwargs = {**_inputs(metric, schema, db), **(options or {}).get(metric.name, {})}
        results = [metric.compute(out, ref, **kwargs) for out, ref in zip(outputs, references)]
        scores = [float(r.score) for r in results]
        for row, s in zip(per_example, scores):
            row[metric.name] = s
        if details is not None:
            if not details:
                details.extend({} for _ in outputs)
            for why, r in zip(details, results):
                if r.detail:
                    why[metric.name] = r.detail
        summary[metric.name] = {"score": float(np.mean(scores)), "ci95": list(bootstrap_ci(scores)), "n": len(scores)}
        if metric.corpus is not None:
            summary[metric.name]["corpus"] = metric.corpus(outputs, [_text(r) for r in references])
    return per_example, summary


def _text(reference: Any) -> str:
    return reference if isinstance(reference, str) else json.dumps(reference, ensure_ascii=False)


def _read_rows(path: Path, field: str) -> list[tuple[str, dict]]:
    """(file:line, row) for each non-blank line; TunelabError naming file:line for bad JSON or a missing field."""
    if not path.is_file():
        raise TunelabError(f"{path} does not exist.")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TunelabError(f"{where}: malformed JSON ({e.msg} at column {e.colno}). "
                                   "Each line must be one JSON object.") from None
            if not isinstance(row, dict) or field not in row:
                raise TunelabError(f"{where}: the row has no {field!r} field. Each line must be an object "
                                   f"with {field!r}{' (a string)' if field == 'output' else ''}.")
            if field == "output" and not isinstance(row["output"], str):
                raise TunelabError(f"{where}: 'output' must be a string, got {type(row['output']).__name__}.")
            rows.append((where, row))
    return rows


def _pair(preds: list[tuple[str, dict]], refs: list[tuple[str, dict]], predictions: Path,
          references: Path) -> list[tuple[tuple[str, dict], tuple[str, dict]]]:
    """Pair rows by `id` when every row in both files has one, else by line order."""
    if all("id" in r for _, r in preds + refs):
        by_id: dict[str, dict] = {}
        for name, rows in (("predictions", preds), ("references", refs)):
            ids = [str(r["id"]) for _, r in rows]
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                raise TunelabError(f"The {name} file has duplicate ids: {', '.join(dupes[:5])}. Ids must be unique.")
            by_id[name] = {str(r["id"]): (w, r) for w, r in rows}
        missing = [i for i in by_id["references"] if i not in by_id["predictions"]]
        extra = [i for i in by_id["predictions"] if i not in by_id["references"]]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} reference ids have no prediction in {predictions} (e.g. {', '.join(missing[:5])})")
            if extra:
                parts.append(f"{len(extra)} prediction ids are not in {references} (e.g. {', '.join(extra[:5])})")
            raise TunelabError("The ids do not match: " + "; ".join(parts) + ". Score predictions made on this split.")
        return [(by_id["predictions"][i], by_id["references"][i]) for i in by_id["references"]]
    if len(preds) != len(refs):
        raise TunelabError(f"{predictions} has {len(preds)} rows but {references} has {len(refs)}; without an 'id' "
                           "in every row they pair by line, so the counts must match.")
    return list(zip(preds, refs))


def score_files(metric: str, predictions: Path, references: Path, schema: Path | None = None,
                db: Path | None = None) -> dict:
    """Score a predictions JSONL (rows with `output`) against a references JSONL (rows with `reference`).

    metric: a registry name. schema: JSON Schema file (schema_valid*). db: SQLite file (sql_*), where the
    reference is the gold SQL. Rows pair by `id` when every row has one, else by line. Every input
    problem is reported before anything is scored. Returns {"metric", "score", "n", "ci95": [lo, hi]}
    (plus "corpus" for bleu and chrf).
    """
    predictions, references = Path(predictions), Path(references)
    entry = check_inputs(metric, schema=schema, db=db)
    schema_dict = load_schema(schema) if schema is not None and "schema" in entry.needs else None
    db_path = check_db(db) if db is not None and "db" in entry.needs else None
    pairs = _pair(_read_rows(predictions, "output"), _read_rows(references, "reference"), predictions, references)
    _, summary = score_examples(
        [metric], [p["output"] for (_, p), _ in pairs], [r["reference"] for _, (_, r) in pairs],
        schema=schema_dict, db=db_path, where=[w for _, (w, _) in pairs],
    )
    return {"metric": metric, **summary[metric]}
