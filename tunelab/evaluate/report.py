"""Compare eval runs: metrics with deltas and CIs, failure classes, flips, sample outputs -> report.md + report.html.

A run is the content of an eval output folder: metrics.json ({"task", "split", "model", "adapter",
"metrics": {name: {"score", "ci95", "n"}}, "failures": {class: count}}) plus "predictions" (the rows of
predictions.jsonl: {"id", "input", "reference", "output", "scores", "failure", "explanations"?}) and, when the adapter
folder (or its parent) holds the training log (train_log.jsonl, or metrics.jsonl in older runs), "train_log" (rows {"step", "loss", "val_loss"?}).
The first run is the baseline every delta and flip is measured against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluate._plots import bar_chart, loss_curves
from tunelab.evaluate.failures import CLASSES, count_classes, passes
from tunelab.evaluate.scoring import bootstrap_ci
from tunelab.runs import layout
from tunelab.runs.html_page import esc, img, page, score_td, table, td, text_cell

SAMPLES = 5  # side-by-side examples shown
FLIP_EXAMPLES = 3  # fixed / broken examples shown per model


def _train_log(folder: Path, adapter: str | None) -> list[dict] | None:
    if not adapter:
        return None
    for base in (Path(adapter), folder / adapter):
        for candidate in (base, base.parent):
            if layout.find_train_log(candidate) is not None:
                return layout.read_train_log(candidate) or None
    return None


def load_run(folder: Path) -> dict:
    """Load one eval output folder (metrics.json + predictions.jsonl, training log when found)."""
    folder = Path(folder)
    run, predictions = layout.read_eval_folder(folder)
    run["predictions"] = predictions
    run.setdefault("model", folder.name)
    run["train_log"] = _train_log(folder, run.get("adapter"))
    return run


def find_runs(folder: Path) -> list[Path]:
    """The run folders in folder: itself when it has metrics.json, else its subfolders that do (sorted)."""
    return layout.find_eval_folders(folder)


def compare_dirs(dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Load eval folders (single runs or folders of runs; the first run found is the baseline) and write the report."""
    runs = [load_run(p) for d in dirs for p in find_runs(d)]
    return write_report(runs, out_dir)


def _labels(runs: list[dict]) -> list[str]:
    labels: list[str] = []
    for i, run in enumerate(runs):
        label = str(run.get("model") or f"run{i}")
        labels.append(label if label not in labels else f"{label}#{i}")
    return labels


def _key(row: dict, i: int) -> str:
    return str(row["id"]) if "id" in row else f"#{i}"


def _by_key(run: dict) -> dict[str, dict]:
    return {_key(r, i): r for i, r in enumerate(run.get("predictions") or [])}


def _correct(row: dict, primary: str) -> bool | None:
    if "failure" in row:
        return row["failure"] is None
    score = (row.get("scores") or {}).get(primary)
    return None if score is None else passes(primary, score)


def _delta(base: dict, run: dict, metric: str, base_rows: dict, rows: dict) -> dict | None:
    """Score delta vs the baseline, with a paired-bootstrap 95% CI when per-example scores pair up."""
    if metric not in base.get("metrics", {}) or metric not in run.get("metrics", {}):
        return None
    delta = run["metrics"][metric]["score"] - base["metrics"][metric]["score"]
    diffs = [
        rows[k]["scores"][metric] - b["scores"][metric]
        for k, b in base_rows.items()
        if k in rows and metric in (b.get("scores") or {}) and metric in (rows[k].get("scores") or {})
    ]
    return {"delta": delta, "ci95": list(bootstrap_ci(diffs)) if len(diffs) >= 2 else None}


def build(runs: list[dict], samples: int = SAMPLES) -> dict[str, Any]:
    """Everything the report shows, as plain data (both renderers read this)."""
    if not runs:
        raise TunelabError("No runs to report on.")
    base = runs[0]
    labels = _labels(runs)
    metrics = list(dict.fromkeys(m for r in runs for m in r.get("metrics", {})))
    primary = base.get("primary_metric") or (metrics[0] if metrics else None)
    keyed = [_by_key(r) for r in runs]
    table = [
        {
            "metric": m,
            "cells": [r.get("metrics", {}).get(m) for r in runs],
            "deltas": [_delta(base, r, m, keyed[0], k) for r, k in zip(runs[1:], keyed[1:])],
        }
        for m in metrics
    ]
    failures = [r.get("failures") or count_classes(r.get("predictions") or []) for r in runs]
    flips = []
    for label, rows in zip(labels[1:], keyed[1:]):
        fixed, broken = [], []
        for k, b in keyed[0].items():
            if k not in rows or primary is None:
                continue
            before, after = _correct(b, primary), _correct(rows[k], primary)
            if before is False and after is True:
                fixed.append((b, rows[k]))
            elif before is True and after is False:
                broken.append((b, rows[k]))
        flips.append({"label": label, "fixed": fixed, "broken": broken})
    sample_rows = [
        {"id": k, "input": b.get("input"), "reference": b.get("reference"),
         "outputs": [rows.get(k, {}).get("output") for rows in keyed],
         "explanations": [rows.get(k, {}).get("explanations") for rows in keyed]}
        for k, b in list(keyed[0].items())[:samples]
    ]
    return {
        "task": base.get("task"), "split": base.get("split"), "labels": labels, "primary": primary,
        "n": base.get("n"), "data_path": ((base.get("provenance") or {}).get("data") or {}).get("path"),
        "table": table, "classes": list(CLASSES), "failures": failures, "flips": flips, "samples": sample_rows,
        "train_logs": {lab: r["train_log"] for lab, r in zip(labels, runs) if r.get("train_log")},
        "by_length": _length_rows(runs),
        "by_group": _group_rows(runs),
    }


def _group_rows(runs: list[dict]) -> list[dict]:
    """[{"metric", "bucket": "field=value", "cells": [...] per run}] from metrics.json "groups" (e.g. handbook-qa's
    fact_in_train: whether finetuning could have seen the fact)."""
    out = []
    for field_name, values in (runs[0].get("groups") or {}).items():
        for value, metrics in values.items():
            for metric in metrics:
                cells = [(((r.get("groups") or {}).get(field_name) or {}).get(value) or {}).get(metric) for r in runs]
                out.append({"metric": metric, "bucket": f"{field_name}={value}", "cells": cells})
    return out


def _length_rows(runs: list[dict]) -> list[dict]:
    """[{"metric", "bucket", "cells": [{"score", "ci95", "n"} or None per run]}] when the runs were bucketed
    by input length (metrics.json "by_length"); buckets are matched by label, so runs must share edges."""
    if not runs[0].get("by_length"):
        return []
    out = []
    for metric, buckets in runs[0]["by_length"]["metrics"].items():
        for b in buckets:
            cells = []
            for r in runs:
                theirs = (r.get("by_length") or {}).get("metrics", {}).get(metric, [])
                cells.append(next((c for c in theirs if c["bucket"] == b["bucket"]), None))
            out.append({"metric": metric, "bucket": b["bucket"], "cells": cells})
    return out


def title(data: dict) -> str:
    """What the report shows, e.g. 'Eval report: base vs lora-a on orders-json (test split), 64 examples' or,
    for `tunelab eval --data mine.jsonl`, '... on mine.jsonl, 64 examples'."""
    path = Path(data.get("data_path") or "")
    if path.name and path.parent.name != data.get("task"):  # a file of the user's (--data), not a task folder
        where = path.name
    else:
        where = f"{data.get('task') or 'task'} ({data.get('split') or 'split'} split)"
    n = data.get("n")
    n = "" if n is None else f", {n} example" + ("s" if n != 1 else "")
    return f"Eval report: {' vs '.join(data['labels'])} on {where}{n}"


def why(explanations: dict | None) -> str:
    """A row's failure reasons as one line: 'json_exact: missing customer.email; sql_exec: no such table'."""
    return "; ".join(f"{m}: {d}" for m, d in (explanations or {}).items())


def fmt_bucket(cell: dict | None) -> str:
    """'0.750 [0.500, 1.000] n=8' for a length bucket; '-' when the bucket is empty or missing."""
    if not cell or cell.get("score") is None:
        return "-"
    return f"{fmt_cell(cell)} n={cell['n']}"


def as_text(value: Any) -> str:
    """A report cell's text: strings unchanged, None empty, anything else (chat messages, JSON) as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1)


def fmt_cell(cell: dict | None) -> str:
    """'0.812 [0.750, 0.870]' for a metric summary (CI omitted when absent); '-' when missing."""
    if cell is None:
        return "-"
    ci = cell.get("ci95")
    return f"{cell['score']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def fmt_delta(delta: dict | None) -> str:
    """'+0.125 [+0.050, +0.200]' (paired-bootstrap CI of the difference when available); '-' when missing."""
    if delta is None:
        return "-"
    ci = delta["ci95"]
    return f"{delta['delta']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _md_escape(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _md_code(text: str, limit: int = 160) -> str:
    text = " ".join(text.replace("`", "'").split())
    return f"`{text[:limit]}{'…' if len(text) > limit else ''}`"


def _fence(text: str) -> str:
    run, longest = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def render_markdown(data: dict) -> str:
    """The report as Markdown (tables and text; the charts are in report.html)."""
    labels = data["labels"]
    out = [f"# {title(data)}", "",
           f"Baseline: **{labels[0]}**. Scores with 95% bootstrap CIs; Δ is vs the baseline with a paired-"
           "bootstrap 95% CI of the difference. Charts and loss curves: report.html.", "", "## Metrics", ""]
    header = ["metric", *labels, *(f"Δ {lab}" for lab in labels[1:])]
    out += ["| " + " | ".join(map(_md_escape, header)) + " |", "|" + "---|" * len(header)]
    for row in data["table"]:
        cells = [row["metric"], *map(fmt_cell, row["cells"]), *map(fmt_delta, row["deltas"])]
        out.append("| " + " | ".join(cells) + " |")
    if data["by_length"]:
        out += ["", "## By input length (tokens)", "", "| metric | tokens | " + " | ".join(map(_md_escape, labels))
                + " |", "|" + "---|" * (len(labels) + 2)]
        out += [f"| {row['metric']} | {row['bucket']} | " + " | ".join(map(fmt_bucket, row["cells"])) + " |"
                for row in data["by_length"]]
    if data.get("by_group"):
        out += ["", "## By example group", "", "| metric | group | " + " | ".join(map(_md_escape, labels))
                + " |", "|" + "---|" * (len(labels) + 2)]
        out += [f"| {row['metric']} | {row['bucket']} | " + " | ".join(map(fmt_bucket, row["cells"])) + " |"
                for row in data["by_group"]]
    out += ["", "## Failure classes", "", "| model | " + " | ".join(data["classes"]) + " |",
            "|" + "---|" * (len(data["classes"]) + 1)]
    for label, counts in zip(labels, data["failures"]):
        out.append(f"| {_md_escape(label)} | " + " | ".join(str(counts.get(c, 0)) for c in data["classes"]) + " |")
    out += ["", f"## Flips vs {labels[0]} (primary metric: {data['primary']})", ""]
    for flip in data["flips"]:
        out.append(f"- **{flip['label']}**: {len(flip['fixed'])} fixed, {len(flip['broken'])} broken")
        for kind in ("fixed", "broken"):
            for b, r in flip[kind][:FLIP_EXAMPLES]:
                reason = why(r.get("explanations") if kind == "broken" else b.get("explanations"))
                out.append(f"  - {kind} `{b.get('id', '')}`: {_md_code(as_text(b.get('output')))} → "
                           f"{_md_code(as_text(r.get('output')))}" + (f" ({_md_escape(reason)})" if reason else ""))
    out += ["", "## Sample outputs", ""]
    for s in data["samples"]:
        out += [f"### {s['id']}", "", "**Input**", "", _fence(as_text(s["input"])), "",
                "**Reference**", "", _fence(as_text(s["reference"])), ""]
        for label, output, expl in zip(labels, s["outputs"], s["explanations"]):
            out += [f"**{label}**", "", _fence(as_text(output)), ""]
            if expl:
                out += [f"Why it failed: {_md_escape(why(expl))}", ""]
    if data["train_logs"]:
        out += ["## Training", ""]
        for label, rows in data["train_logs"].items():
            last = rows[-1]
            val = next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None)
            out.append(f"- {label}: {len(rows)} logged steps, last step {last.get('step')} loss "
                       f"{last.get('loss')}" + (f", last val_loss {val}" if val is not None else ""))
        out.append("")
    return "\n".join(out)

def _score_cell(cell: dict | None) -> str:
    return score_td(cell["score"], cell.get("ci95")) if cell else td("-")


def _bucket_cell(cell: dict | None) -> str:
    if not cell or cell.get("score") is None:
        return td("-")
    return score_td(cell["score"], cell.get("ci95"), f"n={cell['n']}")


def _sample(text: Any, explanations: dict | None) -> str:
    """A sample cell: the text (wrapped, however long its lines), and under it why the output failed."""
    return text_cell(as_text(text), why(explanations))


def render_html(data: dict) -> str:
    """The report as one self-contained HTML page: inline CSS, charts as base64 PNG, no external references."""
    labels = data["labels"]
    parts = [f"<h1>{esc(title(data))}</h1>",
             f"<p>Baseline: <b>{esc(labels[0])}</b>. Scores with 95% bootstrap CIs; &Delta; is vs the baseline "
             "with a paired-bootstrap 95% CI of the difference.</p>", "<h2>Metrics</h2>"]
    rows = []
    for row in data["table"]:
        deltas = [td(fmt_delta(d), "num " + ("pos" if d and d["delta"] > 0 else "neg" if d and d["delta"] < 0 else ""))
                  for d in row["deltas"]]
        rows.append([td(row["metric"], ""), *(_score_cell(c) for c in row["cells"]), *deltas])
    parts.append(table(["metric", *labels, *(f"Δ {lab}" for lab in labels[1:])], rows))
    for row in data["table"]:
        present = [(lab, c) for lab, c in zip(labels, row["cells"]) if c is not None]
        chart = bar_chart(row["metric"], [lab for lab, _ in present], [c["score"] for _, c in present],
                          [c.get("ci95") for _, c in present])
        parts.append(img(chart, f"{row['metric']} by model"))
    for key, heading, column in (("by_length", "By input length (tokens)", "tokens"),
                                 ("by_group", "By example group", "group")):
        if data.get(key):
            parts.append(f"<h2>{heading}</h2>")
            parts.append(table(["metric", column, *labels], [
                [td(row["metric"], ""), td(row["bucket"], ""), *(_bucket_cell(c) for c in row["cells"])]
                for row in data[key]]))
    parts.append("<h2>Failure classes</h2>")
    parts.append(table(["model", *data["classes"]], [
        [td(lab, ""), *(td(counts.get(c, 0)) for c in data["classes"])]
        for lab, counts in zip(labels, data["failures"])]))
    parts.append(f"<h2>Flips vs {esc(labels[0])} (primary metric: {esc(data['primary'])})</h2>")
    for flip in data["flips"]:
        parts.append(f"<h3>{esc(flip['label'])}: {len(flip['fixed'])} fixed, {len(flip['broken'])} broken</h3>")
        examples = [(kind, b, r) for kind in ("fixed", "broken") for b, r in flip[kind][:FLIP_EXAMPLES]]
        if examples:
            parts.append(table(["", "id", labels[0], flip["label"]], [
                [td(kind, ""), td(b.get("id", ""), ""), *(_sample(x.get("output"), x.get("explanations"))
                                                          for x in (b, r))]
                for kind, b, r in examples], fixed=True))
    parts.append("<h2>Sample outputs</h2>")
    for s in data["samples"]:
        cells = [("input", s["input"], None), ("reference", s["reference"], None),
                 *zip(labels, s["outputs"], s["explanations"])]
        parts.append(f"<h3>{esc(s['id'])}</h3>" + table(
            [name for name, _, _ in cells], [[_sample(v, e) for _, v, e in cells]], fixed=True))
    if data["train_logs"]:
        parts += ["<h2>Training loss</h2>", img(loss_curves(data["train_logs"]), "training loss by step")]
    return page(title(data), parts)


def write_report(runs: list[dict], out_dir: Path, samples: int = SAMPLES) -> tuple[Path, Path]:
    """Write report.md and a self-contained report.html (charts inline) comparing runs; the first is the baseline.

    runs: run dicts as load_run returns them. out_dir: created if needed. samples: side-by-side examples.
    Returns (report.md path, report.html path). Files appear whole or not at all (temp file + rename).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = build(runs, samples)
    md, html = out_dir / layout.REPORT_MD, out_dir / layout.REPORT_HTML
    layout.atomic_write_text(md, render_markdown(data))
    layout.atomic_write_text(html, render_html(data))
    return md, html
