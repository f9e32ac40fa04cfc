"""Terminal tables for `tunelab data check`, `memory` and `plan`: the library returns the reports, these draw them.

Commands import this module inside their function: it imports tunelab.memory, which imports torch.
"""

from __future__ import annotations

from rich.table import Table

from tunelab.data import CheckReport
from tunelab.memory import GPUS, Comparison, MemoryEstimate
from tunelab.memory.measure import COMPARED
from tunelab.memory.units import gib
from tunelab.plan import FinetunePlan


def _lines(lines: list, count: int) -> str:
    """The listed line numbers, with "..." when the report lists fewer than it counted."""
    return ", ".join(map(str, lines)) + ("..." if count > len(lines) else "")


def check_table(report: CheckReport) -> Table:
    """`tunelab data check`: format, rows, token lengths, then each problem (green 0, yellow with its lines)."""
    table = Table(title=f"{report.path}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("format", report.format)
    table.add_row("rows", str(report.rows))
    if report.lengths is not None:
        table.add_row("tokens (chat template)", ", ".join(f"{k} {v}" for k, v in report.lengths.items())
                      + f"; total {report.tokens}")
    else:
        table.add_row("tokens", "[dim]pass a model to measure token lengths[/dim]")

    def problem(label: str, count: int, detail: str) -> None:
        style = "green" if count == 0 else "yellow"
        more = f"  lines {detail}" if count else ""
        table.add_row(label, f"[{style}]{count}[/{style}]{more}")

    problem("exact duplicates", report.duplicates,
            _lines([f"{a} (= {b})" for a, b in report.duplicate_lines], report.duplicates))
    problem("empty replies", report.empty, _lines(report.empty_lines, report.empty))
    if report.training is not None:
        table.add_row("tunelab train defaults", report.training)
    if report.lengths is not None:
        problem(f"longer than {report.max_length} tokens", report.too_long,
                _lines(report.too_long_lines, report.too_long))
    return table


def _estimate_caption(e: MemoryEstimate) -> str:
    s = e.settings
    parts = [f"params {e.params_total:,} (trainable {e.params_trainable:,})"]
    keys = ("precision", "seq", "batch", "optimizer", "grad_ckpt", "gpus", "zero")
    parts.append(", ".join(f"{k}={s[k]}" for k in keys if k in s))
    if e.peak:
        parts.append(f"peak: {e.peak}")
    return "\n".join(parts + e.notes)


def estimate_table(e: MemoryEstimate) -> Table:
    """`tunelab memory MODEL`: one row per component, then the total and the GPUs it fits on."""
    s = e.settings
    title = f"{e.model}: {'inference' if s.get('inference') else s.get('method', '')}"
    t = Table(title=title, caption=_estimate_caption(e))
    t.add_column("component")
    t.add_column("bytes", justify="right")
    t.add_column("size", justify="right")
    for k, v in e.bytes.items():
        style = "bold" if k == "total" else None
        t.add_row(k, f"{v:,}", gib(v), style=style)
    fits = ", ".join(f"{k} ({GPUS[k]})" for k, ok in e.fits.items() if ok) or "none of the listed GPUs"
    t.add_row("fits on", "", fits)
    return t


def comparison_table(c: Comparison, title: str | None = None) -> Table:
    """`tunelab memory --measure`: estimate, measurement and error per component; the title says where it was
    measured and on which code path."""
    if title is None:
        title = "estimate vs measured"
        if c.device is not None:
            path = "fast paths" + (", padding-free rows" if c.flat else "") if c.fast_paths else \
                "transformers + PEFT"
            title += f" ({c.device}, {path}; the estimate models transformers + PEFT)"
    t = Table(title=title)
    for col in ("component", "estimate", "measured", "error"):
        t.add_column(col, justify="left" if col == "component" else "right")
    for name in COMPARED:
        t.add_row(name, gib(c.estimate[name]), gib(c.measured[name]), f"{100 * c.error(name):+.1f}%",
                  style="bold" if name == "total" else None)
    return t


def plan_table(p: FinetunePlan) -> Table:
    """`tunelab plan`: each choice with its reason from the guide."""
    t = Table(title=f"plan: {p.model} on {p.gpus} x {gib(p.gpu_memory)} ({p.gpu})", show_lines=True)
    t.add_column("choice")
    t.add_column("reason (from the guide)")
    for choice, reason in p.reasons:
        t.add_row(choice, reason)
    return t
