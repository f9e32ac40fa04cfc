"""JSON metrics: validity, JSON Schema validity, exact parsed equality and field-level F1, strict and lenient.

Strict variants take the output as it stands: the whole output, stripped, must be one JSON value
(NaN and Infinity are rejected, as in RFC 8259). Lenient variants first try strict parsing, then the
first ```json fenced block (or plain ``` fence) that parses, then the first embedded {...} or [...] that
parses. metrics.json reports them under separate names so the strict number stays honest.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from tunelab.evaluate.metrics.base import MetricResult

_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\r?\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_OPENERS = re.compile(r"[\[{]")
_MAX_EMBEDDED_TRIES = 200  # bound the scan on long outputs full of braces


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_strict(output: str) -> tuple[Any, str | None]:
    """Parse the whole stripped output as JSON: (value, None) or (None, error message)."""
    text = output.strip()
    if not text:
        return None, "empty output"
    try:
        return _DECODER.decode(text), None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return None, f"not JSON: {e}"


def parse_lenient(output: str) -> tuple[Any, str | None]:
    """Parse JSON from the output: whole output, else a fenced block, else the first embedded {...}/[...]."""
    value, error = parse_strict(output)
    if error is None:
        return value, None
    for block in _FENCE.findall(output):
        value, block_error = parse_strict(block)
        if block_error is None:
            return value, None
    for i, match in enumerate(_OPENERS.finditer(output)):
        if i >= _MAX_EMBEDDED_TRIES:
            break
        try:
            value, _ = _DECODER.raw_decode(output, match.start())
            return value, None
        except ValueError:
            continue
    return None, f"no JSON found ({error})"


def reference_value(reference: Any) -> Any:
    """A JSON reference as a Python value: strings are parsed as JSON text, other values used as they are."""
    if isinstance(reference, str):
        value, error = parse_strict(reference)
        if error is not None:
            raise ValueError(f"reference is not JSON text: {error}")
        return value
    return reference


def canonical(value: Any) -> Any:
    """A hashable form where JSON equality is Python equality (true != 1, 1 == 1.0, key order ignored)."""
    if isinstance(value, bool):
        return ("bool", value)
    if value is None:
        return ("null",)
    if isinstance(value, (int, float)):
        return ("num", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, dict):
        return ("obj", tuple(sorted((str(k), canonical(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("arr", tuple(canonical(v) for v in value))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def flatten(value: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Flatten to {path: canonical leaf}; list items are indexed (items.0.product), empty {} / [] are leaves."""
    if isinstance(value, dict) and value:
        out: dict[tuple, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, (*prefix, str(k))))
        return out
    if isinstance(value, (list, tuple)) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, (*prefix, i)))
        return out
    return {prefix: canonical(value)}


def field_prf(predicted: Any, reference: Any) -> tuple[float, float, float]:
    """Precision, recall and F1 over flattened path=value pairs of two parsed JSON values."""
    pred, ref = flatten(predicted), flatten(reference)
    hits = sum(1 for path, leaf in pred.items() if path in ref and ref[path] == leaf)
    if hits == 0:
        return 0.0, 0.0, 0.0
    precision, recall = hits / len(pred), hits / len(ref)
    return precision, recall, 2 * precision * recall / (precision + recall)


def _show_path(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(root)"


def _show_leaf(leaf: tuple) -> str:
    kind = leaf[0]
    if kind == "null":
        return "null"
    if kind in ("obj", "arr"):  # an empty {} or [] (non-empty ones are flattened further)
        return "{}" if kind == "obj" else "[]"
    return json.dumps(leaf[1], ensure_ascii=False)


def field_diff(predicted: Any, reference: Any, limit: int = 3) -> str | None:
    """How two parsed JSON values differ, by flattened path: 'missing customer.email; wrong items.0.qty
    (2, expected 3); extra note'. At most `limit` paths of each kind are named. None when equal."""
    pred, ref = flatten(predicted), flatten(reference)
    missing = [p for p in ref if p not in pred]
    wrong = [p for p in ref if p in pred and pred[p] != ref[p]]
    extra = [p for p in pred if p not in ref]
    parts = []
    for label, paths, show in (
        ("missing", missing, _show_path),
        ("wrong", wrong, lambda p: f"{_show_path(p)} ({_show_leaf(pred[p])}, expected {_show_leaf(ref[p])})"),
        ("extra", extra, _show_path),
    ):
        if paths:
            more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
            parts.append(f"{label} {', '.join(show(p) for p in paths[:limit])}{more}")
    return "; ".join(parts) or None


@lru_cache(maxsize=32)
def _validator(schema_text: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_text))


def schema_error(value: Any, schema: dict) -> str | None:
    """The most relevant Draft 2020-12 validation error for value, as 'path: message', or None if valid."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


def _valid(parse, output: str) -> MetricResult:
    _, error = parse(output)
    return MetricResult(float(error is None), error)


def _schema(parse, output: str, schema: dict) -> MetricResult:
    value, error = parse(output)
    if error is None:
        error = schema_error(value, schema)
    return MetricResult(float(error is None), error)


def _exact(parse, output: str, reference: Any) -> MetricResult:
    value, error = parse(output)
    if error is not None:
        return MetricResult(0.0, error)
    gold = reference_value(reference)
    if canonical(value) == canonical(gold):
        return MetricResult(1.0)
    return MetricResult(0.0, field_diff(value, gold))


def _f1(parse, output: str, reference: Any) -> MetricResult:
    value, error = parse(output)
    if error is not None:
        return MetricResult(0.0, error)
    gold = reference_value(reference)
    f1 = field_prf(value, gold)[2]
    return MetricResult(f1, None if f1 == 1.0 else field_diff(value, gold))


def json_valid_result(output: str, reference: Any = None) -> MetricResult:
    """json_valid with the parse error as detail."""
    return _valid(parse_strict, output)


def json_valid_lenient_result(output: str, reference: Any = None) -> MetricResult:
    """json_valid_lenient with the parse error as detail."""
    return _valid(parse_lenient, output)


def schema_valid_result(output: str, reference: Any = None, *, schema: dict) -> MetricResult:
    """schema_valid with the parse or validation error as detail."""
    return _schema(parse_strict, output, schema)


def schema_valid_lenient_result(output: str, reference: Any = None, *, schema: dict) -> MetricResult:
    """schema_valid_lenient with the parse or validation error as detail."""
    return _schema(parse_lenient, output, schema)


def json_exact_result(output: str, reference: Any) -> MetricResult:
    """json_exact with the parse error as detail."""
    return _exact(parse_strict, output, reference)


def json_exact_lenient_result(output: str, reference: Any) -> MetricResult:
    """json_exact_lenient with the parse error as detail."""
    return _exact(parse_lenient, output, reference)


def field_f1_result(output: str, reference: Any) -> MetricResult:
    """field_f1 with the parse error as detail."""
    return _f1(parse_strict, output, reference)


def field_f1_lenient_result(output: str, reference: Any) -> MetricResult:
    """field_f1_lenient with the parse error as detail."""
    return _f1(parse_lenient, output, reference)


def json_valid(output: str, reference: Any = None) -> float:
    """1.0 when the whole output, stripped, parses as JSON (strict: no fences, no surrounding prose)."""
    return json_valid_result(output).score


def json_valid_lenient(output: str, reference: Any = None) -> float:
    """1.0 when JSON can be extracted: whole output, a ```json fence, or the first embedded {...}/[...]."""
    return json_valid_lenient_result(output).score


def schema_valid(output: str, reference: Any = None, *, schema: dict) -> float:
    """1.0 when the output as it stands is JSON that validates against the JSON Schema (Draft 2020-12)."""
    return schema_valid_result(output, schema=schema).score


def schema_valid_lenient(output: str, reference: Any = None, *, schema: dict) -> float:
    """1.0 when JSON extracted as in json_valid_lenient validates against the JSON Schema (Draft 2020-12)."""
    return schema_valid_lenient_result(output, schema=schema).score


def json_exact(output: str, reference: Any) -> float:
    """1.0 when the output parses (strictly) to a value equal to the reference JSON (key order ignored)."""
    return json_exact_result(output, reference).score


def json_exact_lenient(output: str, reference: Any) -> float:
    """1.0 when JSON extracted leniently equals the reference JSON (key order ignored)."""
    return json_exact_lenient_result(output, reference).score


def field_f1(output: str, reference: Any) -> float:
    """F1 over flattened path=value pairs (lists indexed: items.0.product) of strictly parsed output vs reference."""
    return field_f1_result(output, reference).score


def field_f1_lenient(output: str, reference: Any) -> float:
    """field_f1 on JSON extracted leniently (fence or embedded object)."""
    return field_f1_lenient_result(output, reference).score
