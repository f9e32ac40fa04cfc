"""Failure classes for wrong examples: format, content, knowledge, refusal, so a report says what kind of fix helps.

Rules, applied in this order to an example whose primary metric is below its pass threshold:

1. refusal   - the output declines the request: `refusal=True`, or (when `refusal` is None) the
               `refusal` score is 1.0, or (when neither is given) the output matches the refusal lists.
2. format    - the output is not well-formed for the task. kind "json": the output is not strict JSON
               (`json_valid` score, computed here if absent) or fails the schema (`schema_valid` == 0
               when that score is present). kind "sql": the SQL does not parse or run (`sql_valid` == 0
               when present; otherwise the output is empty or does not start like a query:
               SELECT / WITH / VALUES / a parenthesis).
3. knowledge - the reference answer is in the task's corpus (`corpus_hit=True`, passed for facts tasks)
               but the output misses it: the model lacks or did not retrieve the fact.
4. content   - everything else: well-formed but wrong values.

Correct examples (primary score >= threshold) get None. The default threshold is 1.0, except for
the overlap metrics rouge_l, bleu and chrf where it is 0.5; pass `threshold` to override.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from tunelab.evaluate.metrics.refusal import is_refusal
from tunelab.evaluate.metrics.structured import parse_strict

CLASSES: tuple[str, ...] = ("format", "content", "knowledge", "refusal")
DEFAULT_THRESHOLDS: dict[str, float] = {"rouge_l": 0.5, "bleu": 0.5, "chrf": 0.5}
_QUERY_START = re.compile(r"^\s*(?:select|with|values|\()", re.IGNORECASE)


def passes(metric: str, score: float, threshold: float | None = None) -> bool:
    """True when the score counts as correct for this metric (see module doc for default thresholds)."""
    return score >= (threshold if threshold is not None else DEFAULT_THRESHOLDS.get(metric, 1.0))


def _is_format_failure(kind: str, output: str, scores: dict[str, float]) -> bool:
    if kind == "json":
        valid = scores["json_valid"] if "json_valid" in scores else float(parse_strict(output)[1] is None)
        return valid < 1.0 or scores.get("schema_valid", 1.0) < 1.0
    if kind == "sql":
        if "sql_valid" in scores:
            return scores["sql_valid"] < 1.0
        return not _QUERY_START.match(output)
    return False


def classify(kind: str, output: str, reference: Any, scores: dict[str, float], primary_metric: str,
             corpus_hit: bool | None = None, refusal: bool | None = None,
             threshold: float | None = None) -> str | None:
    """The failure class of one example, or None when it is correct.

    kind: the task kind ("json", "sql", "facts", "text", ...); only json and sql have format rules.
    output / reference: the example (the current rules read only the output). scores: {metric: score} for this example; must hold primary_metric.
    corpus_hit: whether the reference answer is in the task's corpus (None: no corpus).
    refusal: whether the output is a refusal (None: decide from scores or the refusal lists).
    threshold: pass mark for the primary metric (None: the metric's default).
    """
    if primary_metric not in scores:
        raise KeyError(f"scores has no {primary_metric!r} (the primary metric); got {sorted(scores)}")
    if passes(primary_metric, scores[primary_metric], threshold):
        return None
    if refusal is None:
        refusal = scores["refusal"] >= 1.0 if "refusal" in scores else is_refusal(output)
    if refusal:
        return "refusal"
    if _is_format_failure(kind, output, scores):
        return "format"
    if corpus_hit:
        return "knowledge"
    return "content"


def count_classes(rows: Iterable[dict | str | None]) -> dict[str, int]:
    """Count failure classes over prediction rows (dicts with a "failure" key) or bare class values.

    Every class in CLASSES is present (0 when unseen); correct examples (None) are not counted.
    """
    counts = dict.fromkeys(CLASSES, 0)
    for row in rows:
        cls = row.get("failure") if isinstance(row, dict) else row
        if cls is None:
            continue
        if cls not in counts:
            raise ValueError(f"unknown failure class {cls!r}; expected one of {CLASSES}")
        counts[cls] += 1
    return counts
