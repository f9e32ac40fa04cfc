"""The ladder's report: ladder.json (everything measured) and ladder.html (one self-contained page)."""

from __future__ import annotations

import html
from pathlib import Path

from tunelab.evaluate._plots import bar_chart, stacked_bars
from tunelab.evaluate.failures import CLASSES
from tunelab.ladder.results import LadderResult
from tunelab.runs.layout import atomic_write_text, write_json

LADDER_JSON, LADDER_HTML = "ladder.json", "ladder.html"
CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
       "td.num{text-align:right;font-variant-numeric:tabular-nums}.verdict{font-size:1.3em;padding:.6em;"
       "background:#eef5ff;border-left:4px solid #4c78a8}img{max-width:100%}")


def ladder_json(res: LadderResult) -> dict:
    return {"task": res.task, "primary_metric": res.primary, "rungs": [r.to_json() for r in res.results],
            "skipped": res.skipped, "recommendation": res.recommendation.to_json()}


def write_ladder(res: LadderResult) -> Path:
    """Write ladder.json and ladder.html into res.out_dir; returns the HTML path."""
    write_json(res.out_dir / LADDER_JSON, ladder_json(res))
    return atomic_write_text(res.out_dir / LADDER_HTML, render(res))


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(res: LadderResult) -> str:
    esc, rec, rs = html.escape, res.recommendation, res.results
    labels = [r.label for r in rs]
    metrics = list(rs[0].metrics) if rs else []
    charts = [bar_chart(m, labels, [r.metrics[m]["score"] for r in rs], [r.metrics[m].get("ci95") for r in rs])
              for m in metrics]
    charts.append(stacked_bars("failure classes", labels, {c: [r.failures.get(c, 0) for r in rs] for c in CLASSES},
                               "examples"))
    head = ["rung", *metrics, *CLASSES, "s / example", "peak RSS MB", "training s"]
    rows = []
    for r in rs:
        cells = [f"<td>{esc(r.label)}</td>"]
        for m in metrics:
            v = r.metrics[m]
            lo, hi = v.get("ci95", (None, None))
            cells.append(f'<td class="num">{_num(v["score"])} [{_num(lo)}, {_num(hi)}]</td>')
        cells += [f'<td class="num">{r.failures.get(c, 0)}</td>' for c in CLASSES]
        cells += [f'<td class="num">{_num(r.latency_s, 2)}</td>', f'<td class="num">{_num(r.peak_rss_mb, 0)}</td>',
                  f'<td class="num">{_num(r.train_seconds, 0)}</td>']
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
    diffs = "".join(f"<li>{esc(d['b'])} vs {esc(d['a'])}: {d['delta']:+.3f} (95% CI {d['ci95'][0]:+.3f} to "
                    f"{d['ci95'][1]:+.3f}){' better' if d['better'] else ' worse' if d['worse'] else ''}</li>"
                    for d in rec.diffs)
    skipped = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in res.skipped.items())
    imgs = "".join(f'<img alt="chart" src="data:image/png;base64,{c}">' for c in charts)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ladder: {esc(res.task)}</title>"
            f"<style>{CSS}</style></head><body><h1>Escalation ladder: {esc(res.task)}</h1>"
            f"<p class='verdict'>{esc(rec.headline)}</p><h2>Why</h2><ul>"
            + "".join(f"<li>{esc(x)}</li>" for x in rec.reasons) + "</ul>"
            + ("<h2>Next</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in rec.next_steps) + "</ul>"
               if rec.next_steps else "")
            + f"<h2>Rungs</h2><p>primary metric: {esc(res.primary)}; metrics with 95% bootstrap CIs; failure "
            f"classes count wrong examples.</p>{table}{imgs}<h2>Paired differences against the first rung</h2>"
            f"<ul>{diffs}</ul>" + (f"<h2>Not run</h2><ul>{skipped}</ul>" if skipped else "")
            + "</body></html>")
