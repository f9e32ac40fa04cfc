"""Print an eval result as terminal tables: metrics with 95% CIs, failure classes, regression checks."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tunelab.evaluate.failures import CLASSES


def metrics_table(metrics: dict[str, dict], title: str = "") -> Table:
    """One row per variant (label -> metrics.json content), one column per metric and failure class."""
    labels = list(metrics)
    names = list(next(iter(metrics.values()))["metrics"]) if metrics else []
    t = Table(title=title or None)
    t.add_column("model")
    for n in names:  # fold, not "…": a cut-off score or header is worse than a taller table
        t.add_column(n, justify="right", overflow="fold")
    for c in CLASSES:
        t.add_column(c, justify="right", style="dim", overflow="fold")
    for label in labels:
        m = metrics[label]["metrics"]
        cells = [f"{m[n]['score']:.3f} [{m[n]['ci95'][0]:.2f},{m[n]['ci95'][1]:.2f}]" for n in names]
        fails = [str(metrics[label]["failures"].get(c, 0)) for c in CLASSES]
        t.add_row(label, *cells, *fails)
    return t


def render_result(result, console: Console | None = None) -> None:
    """Print an EvalResult: the metrics table, the general/safety regression tables, the report paths."""
    console = console or Console()
    first = next(iter(result.metrics.values()), {})
    console.print(metrics_table(result.metrics, f"{first.get('task')} / {first.get('split')} "
                                                f"(n={first.get('n')}), metric [95% CI]; failures"))
    gen = result.extra.get("general")
    if gen:
        t = Table(title=f"general regression (forgetting = drop > {gen['threshold_points']} points)")
        for c in ("model", "metric", "score", "delta (points)", "forgetting"):
            t.add_column(c)
        for label, r in gen["models"].items():
            t.add_row(label, r["metric"], f"{r['score']:.3f}", f"{r['delta_points']:+.1f}",
                      "[red]YES[/red]" if r["forgetting"] else "no")
        console.print(t)
    saf = result.extra.get("safety")
    if saf:
        t = Table(title="safety probes")
        for c in ("model", "refusal rate (harmful)", "over-refusal rate (benign)"):
            t.add_column(c)
        for label, r in saf.items():
            t.add_row(label, f"{r['refusal_rate']:.2f} (n={r['n_harmful']})",
                      f"{r['over_refusal_rate']:.2f} (n={r['n_benign']})")
        console.print(t)
    if result.report:
        console.print(f"report: {result.report[0]}\nreport: {result.report[1]}")
