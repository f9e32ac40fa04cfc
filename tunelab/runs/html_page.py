"""The one HTML writer: a self-contained page (one stylesheet, inline charts) and the pieces reports build it from.

The eval report (tunelab.evaluate.report), the ladder report (tunelab.ladder.report) and the demo page
(tunelab.demo) are all written with it. Pages fit a 1280 px window: long unbroken text wraps inside its cell
(and scrolls past 20 lines), wide tables scroll inside their own box, a score's CI sits on one line under it.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.ci { display: block; font-size: 0.8em; color: #555; white-space: nowrap; }
.wide { overflow-x: auto; max-width: 100%; }
table.cols { table-layout: fixed; width: 100%; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; max-height: 20em; overflow: auto; }
.pos { color: #18794e; } .neg { color: #c62828; }
p.why { color: #c62828; font-size: 0.9em; margin: 0.3em 0 0; overflow-wrap: anywhere; }
.verdict { font-size: 1.2em; padding: 0.6em; background: #eef5ff; border-left: 4px solid #4c78a8; }
.note { color: #555; }
img { max-width: 100%; margin: 0.5em; }
"""


def esc(value: object) -> str:
    return html.escape(str(value))


def page(title: str, body: Iterable[str]) -> str:
    """A whole page: `title` in <title>, `body` (HTML fragments) joined in <body>, the one stylesheet inline."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def td(text: object, cls: str = "num") -> str:
    """A table cell holding `text` (escaped); cls "num" right-aligns it on one line."""
    return f'<td class="{cls}">{esc(text)}</td>' if cls else f"<td>{esc(text)}</td>"


def score_td(score: float | None, ci: list[float] | tuple | None = None, note: str = "", digits: int = 3) -> str:
    """A score with its 95% CI on one line under it (and `note`, e.g. "n=8", on another): never wrapped."""
    if score is None:
        return '<td class="num">-</td>'
    lo_hi = f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci and None not in ci else ""
    small = "".join(f'<span class="ci">{esc(x)}</span>' for x in (lo_hi, note) if x)
    return f'<td class="num">{score:.{digits}f}{small}</td>'


def table(header: list[str], rows: Iterable[list[str]], fixed: bool = False) -> str:
    """A table (rows: lists of rendered <td> cells) in a box that scrolls sideways when it is wider than the
    page; `fixed`: equal columns across the page width (side-by-side texts: every column stays in view)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    cls = ' class="cols"' if fixed else ""
    return f'<div class="wide"><table{cls}><tr>{head}</tr>{body}</table></div>'


def text_cell(text: str, note: str = "") -> str:
    """A cell of free text (a model's output): wrapped at any character, scrolling past 20 lines; `note`
    (e.g. why it failed) under it."""
    extra = f'<p class="why">{esc(note)}</p>' if note else ""
    return f'<td><pre>{esc(text)}</pre>{extra}</td>'


def img(b64_png: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64_png}">'


def bullets(items: Iterable[str]) -> str:
    """An unordered list of plain-text items (escaped); empty string when there are none."""
    lis = "".join(f"<li>{esc(x)}</li>" for x in items)
    return f"<ul>{lis}</ul>" if lis else ""
