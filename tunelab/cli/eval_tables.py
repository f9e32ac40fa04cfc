"""`tunelab eval`'s terminal tables: metrics with 95% CIs, failure classes, regression checks."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

PLAIN_WIDTH = 80  # columns when the output is not a terminal
MODEL_WIDTH = 16  # a longer model label is cut with "…" (the report has it whole)


def _short(x: float) -> str:
    return f"{x:.2f}".removeprefix("0")  # ".75", "1.00"


def metrics_table(metrics: dict[str, dict], title: str = "") -> Table:
    """One row per variant (label -> metrics.json content), one column per metric, one for failure classes.

    Sized for 80 columns: a score and its 95% CI (".75-.88") sit on two lines, long model labels and metric headers are
    cut with "…" (the report has them whole), the failure counts share one column."""
    from tunelab.evaluate.failures import CLASSES

    labels = list(metrics)
    names = list(next(iter(metrics.values()))["metrics"]) if metrics else []
    t = Table(title=title or None)
    t.add_column("model", overflow="ellipsis", no_wrap=True, max_width=MODEL_WIDTH)
    for n in names:  # the header is cut, never the score (fold: a CI wraps rather than losing digits)
        t.add_column(Text(n, overflow="ellipsis", no_wrap=True), justify="right", overflow="fold", min_width=8)
    t.add_column("failures\n" + "/".join(c[0] for c in CLASSES), justify="right", style="dim")
    for label in labels:
        m = metrics[label]["metrics"]
        cells = [f"{m[n]['score']:.3f}\n{_short(m[n]['ci95'][0])}-{_short(m[n]['ci95'][1])}" for n in names]
        fails = "/".join(str(metrics[label]["failures"].get(c, 0)) for c in CLASSES)
        t.add_row(label, *cells, fails)
    if names:
        t.caption = "failures: " + ", ".join(f"{c[0]} = {c}" for c in CLASSES)
    return t


def fitted_console(stderr: bool = False) -> Console:
    """A console as wide as the terminal, or 80 columns when the output is not one (a log, a pipe): rich
    would otherwise take the width of whichever std stream is still a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PLAIN_WIDTH)


def _ci(lo_hi: list[float]) -> str:
    return f"[{lo_hi[0]:+.1f},{lo_hi[1]:+.1f}]"


def _length_table(metrics: dict[str, dict]) -> Table | None:
    """The primary metric per input-length bucket (rows) and model (columns), when the eval was bucketed."""
    first = next(iter(metrics.values()), {})
    buckets = first.get("by_length")
    if not buckets:
        return None
    pm = first.get("primary_metric")
    pm = pm if pm in buckets["metrics"] else next(iter(buckets["metrics"]))
    t = Table(title=f"{pm} by input tokens, score (n)")
    t.add_column("tokens")
    for label in metrics:
        t.add_column(label, justify="right", overflow="ellipsis", no_wrap=True, max_width=MODEL_WIDTH)
    for i, cell in enumerate(buckets["metrics"][pm]):
        row = []
        for meta in metrics.values():
            c = meta["by_length"]["metrics"][pm][i]
            row.append("-" if c["score"] is None else f"{c['score']:.3f} ({c['n']})")
        t.add_row(cell["bucket"], *row)
    return t


def _per_model_table(title: str, columns: tuple[str, ...]) -> Table:
    """A table with a row per model: the model's name cut with an ellipsis, the other cells folded."""
    t = Table(title=title)
    t.add_column("model", overflow="ellipsis", max_width=MODEL_WIDTH)
    for c in columns:
        t.add_column(c, overflow="fold", max_width=MODEL_WIDTH)
    return t


def render_result(result, console: Console | None = None) -> None:
    """Print an EvalResult: the metrics table, the general/safety regression tables, the report paths."""
    console = console or fitted_console()
    first = next(iter(result.metrics.values()), {})
    if result.metrics:
        console.print(metrics_table(result.metrics, f"{first.get('task')} / {first.get('split')} "
                                                    f"(n={first.get('n')}): score and 95% CI"))
    lengths = _length_table(result.metrics)
    if lengths is not None:
        console.print(lengths)
    gen = result.extra.get("general")
    if gen:
        t = _per_model_table(f"general regression: forgetting = paired 95% CI of the change below 0 and a drop > "
                             f"{gen['threshold_points']} points", ("score", "change (points) [95% CI]", "forgetting"))
        for label, r in gen["models"].items():
            t.add_row(label, f"{r['score']:.3f}", f"{r['delta_points']:+.1f}\n{_ci(r['ci95_points'])}",
                      "[red]YES[/red]" if r["forgetting"] else "no")
        console.print(t)
    saf = result.extra.get("safety")
    if saf:
        t = _per_model_table(f"safety probes: rate [95% CI]; worse = paired CI of the change excludes 0 and it "
                             f"exceeds {saf['threshold_points']} points", ("refusal (harmful)", "over-refusal (benign)",
                                                                            "worse"))
        for label, r in saf["models"].items():
            cells = [f"{x['rate']:.2f} [{x['ci95'][0]:.2f},{x['ci95'][1]:.2f}]\nn={x['n']}"
                     for x in (r["refusal"], r["over_refusal"])]
            t.add_row(label, *cells, "[red]YES[/red]" if r["worse"] else "no")
        console.print(t)
    if result.report:
        # soft_wrap: a path stays on one line, so it can be pasted
        console.print(f"report: {result.report[0]}\nreport: {result.report[1]}", markup=False, highlight=False,
                      soft_wrap=True)
