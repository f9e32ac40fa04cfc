"""Report charts as base64 PNG strings (matplotlib Agg canvas, no pyplot state), for inlining in HTML."""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bar_chart(metric: str, labels: list[str], scores: list[float], cis: list[list[float] | None]) -> str:
    """One bar per model with its 95% CI as an error bar; returns base64 PNG."""
    fig = Figure(figsize=(1.2 + 1.1 * len(labels), 3.2))
    ax = fig.subplots()
    lower = [max(0.0, s - ci[0]) if ci else 0.0 for s, ci in zip(scores, cis)]
    upper = [max(0.0, ci[1] - s) if ci else 0.0 for s, ci in zip(scores, cis)]
    xs = range(len(labels))
    ax.bar(xs, scores, yerr=[lower, upper], capsize=4, color="#4c78a8")
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylim(0, max(1.0, *(s + u for s, u in zip(scores, upper))))
    ax.set_title(metric)
    ax.set_ylabel("score (95% CI)")
    return _png(fig)


def loss_curves(curves: dict[str, list[dict]]) -> str:
    """Training loss (solid) and validation loss (dashed, where logged) against step, one colour per model."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    for i, (label, rows) in enumerate(curves.items()):
        colour = f"C{i}"
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=colour, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=colour, linestyle="--", marker="o", markersize=3, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    return _png(fig)


def stacked_bars(title: str, labels: list[str], stacks: dict[str, list[float]], ylabel: str) -> str:
    """One bar per label, split into the named stacks (e.g. failure classes); returns base64 PNG."""
    return _png(stacked_figure(title, labels, stacks, ylabel))


def stacked_figure(title: str, labels: list[str], stacks: dict[str, list[float]], ylabel: str) -> Figure:
    """The figure of `stacked_bars`; its legend sits beside the axes, where it cannot cover a bar."""
    fig = Figure(figsize=(1.2 + 1.1 * len(labels), 3.2))
    ax = fig.subplots()
    xs, bottom = range(len(labels)), [0.0] * len(labels)
    for i, (name, values) in enumerate(stacks.items()):
        ax.bar(xs, values, bottom=bottom, color=f"C{i}", label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if stacks:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return fig
