"""METRICS: every metric by name, with the reference it expects and the extra inputs (schema, db) it needs."""

from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import overlap, refusal, sql, structured, text
from tunelab.evaluate.metrics.base import Metric

METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("exact_match", text.exact_match, "text"),
        Metric("contains", text.contains, "text"),
        Metric("regex", text.regex, "pattern"),
        Metric("json_valid", structured.json_valid, "none", explain=structured.json_valid_result),
        Metric("json_valid_lenient", structured.json_valid_lenient, "none",
               explain=structured.json_valid_lenient_result),
        Metric("schema_valid", structured.schema_valid, "none", ("schema",),
               explain=structured.schema_valid_result),
        Metric("schema_valid_lenient", structured.schema_valid_lenient, "none", ("schema",),
               explain=structured.schema_valid_lenient_result),
        Metric("json_exact", structured.json_exact, "json", explain=structured.json_exact_result),
        Metric("json_exact_lenient", structured.json_exact_lenient, "json",
               explain=structured.json_exact_lenient_result),
        Metric("field_f1", structured.field_f1, "json", explain=structured.field_f1_result),
        Metric("field_f1_lenient", structured.field_f1_lenient, "json", explain=structured.field_f1_lenient_result),
        Metric("rouge_l", overlap.rouge_l, "text"),
        Metric("bleu", overlap.bleu, "text", corpus=overlap.corpus_bleu),
        Metric("chrf", overlap.chrf, "text", corpus=overlap.corpus_chrf),
        Metric("sql_exec", sql.sql_exec, "sql", ("db",), explain=sql.sql_exec_result),
        Metric("sql_valid", sql.sql_valid, "none", ("db",), explain=sql.sql_valid_result),
        Metric("refusal", refusal.refusal, "none"),
    ]
}

_FLAGS = {"schema": "--schema FILE.json (a JSON Schema)", "db": "--db FILE.sqlite (a SQLite database)"}


def get_metric(name: str) -> Metric:
    """The registry entry for name; TunelabError listing the valid names when it is unknown."""
    if name not in METRICS:
        raise TunelabError(f"Unknown metric {name!r}. Valid metrics: {', '.join(METRICS)}.")
    return METRICS[name]


def check_inputs(name: str, **inputs) -> Metric:
    """The metric, after checking that every extra input it needs was given (TunelabError naming the flag)."""
    metric = get_metric(name)
    for need in metric.needs:
        if inputs.get(need) is None:
            raise TunelabError(f"Metric {name!r} needs {_FLAGS[need]}; pass it with {_FLAGS[need].split()[0]}.")
    return metric
