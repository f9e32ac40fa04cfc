"""The ladder's report: ladder.json (everything measured) and ladder.html (one self-contained page)."""

from __future__ import annotations

from pathlib import Path

from tunelab.evaluate._plots import bar_chart, stacked_bars
from tunelab.evaluate.failures import CLASSES
from tunelab.ladder.results import LadderResult
from tunelab.runs.html_page import bullets, esc, img, page, score_td, table, td
from tunelab.runs.layout import atomic_write_text, write_json

LADDER_JSON, LADDER_HTML = "ladder.json", "ladder.html"


def ladder_json(res: LadderResult) -> dict:
    return {"task": res.task, "primary_metric": res.primary, "rungs": [r.to_json() for r in res.results],
            "skipped": res.skipped, "recommendation": res.recommendation.to_json()}


def write_ladder(res: LadderResult) -> Path:
    """Write ladder.json and ladder.html into res.out_dir; returns the HTML path."""
    write_json(res.out_dir / LADDER_JSON, ladder_json(res))
    return atomic_write_text(res.out_dir / LADDER_HTML, render(res))


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def baseline(res: LadderResult) -> str | None:
    """The rung every comparison in the report is made against (the best prompted one), said once."""
    diffs = res.recommendation.diffs
    return diffs[0]["a"] if diffs else (res.results[0].label if res.results else None)


def sections(res: LadderResult, level: int = 1, verdict: bool = True) -> list[str]:
    """The report's body as HTML fragments: headings from <h`level`>; `verdict`: show the headline (the demo
    page shows it in its summary instead)."""
    rec, rs = res.recommendation, res.results
    h, sub = f"h{level}", f"h{level + 1}"
    labels = [r.label for r in rs]
    metrics = list(rs[0].metrics) if rs else []
    charts = [bar_chart(m, labels, [r.metrics[m]["score"] for r in rs], [r.metrics[m].get("ci95") for r in rs])
              for m in metrics]
    charts.append(stacked_bars("failure classes", labels, {c: [r.failures.get(c, 0) for r in rs] for c in CLASSES},
                               "examples"))
    rows = [[td(r.label, ""), *(score_td(r.metrics[m]["score"], r.metrics[m].get("ci95")) for m in metrics),
             *(td(r.failures.get(c, 0)) for c in CLASSES),
             td(_num(r.latency_s, 2)), td(_num(r.peak_rss_mb, 0)), td(_num(r.train_seconds, 0))] for r in rs]
    base = baseline(res)
    diffs = [f"{d['b']}: {d['delta']:+.3f} (95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})"
             + (" better" if d["better"] else " worse" if d["worse"] else "") for d in rec.diffs]
    parts = [f"<{h}>Escalation ladder: {esc(res.task)}</{h}>"]
    if verdict:
        parts.append(f"<p class='verdict'>{esc(rec.headline)}</p>")
    parts.append(f"<p class='note'>Every comparison is against <b>{esc(base)}</b>, on the same examples: "
                 "differences with paired-bootstrap 95% CIs.</p>")
    parts += [f"<{sub}>Why</{sub}>", bullets(rec.reasons)]
    if rec.next_steps:
        parts += [f"<{sub}>Next</{sub}>", bullets(rec.next_steps)]
    parts += [f"<{sub}>Rungs</{sub}>",
              f"<p>primary metric: {esc(res.primary)}; metrics with 95% bootstrap CIs; failure classes count wrong "
              "examples.</p>",
              table(["rung", *metrics, *CLASSES, "s / example", "peak RSS MB", "training s"], rows),
              "".join(img(c, "chart") for c in charts)]
    if diffs:
        parts += [f"<{sub}>Paired differences against {esc(base)}</{sub}>", bullets(diffs)]
    if res.skipped:
        parts += [f"<{sub}>Not run</{sub}>", bullets(f"{k}: {v}" for k, v in res.skipped.items())]
    return parts


def render(res: LadderResult) -> str:
    """ladder.html: one self-contained page."""
    return page(f"ladder: {res.task}", sections(res))
