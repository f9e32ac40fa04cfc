"""The UI's page shell: the one HTML look (tunelab.runs.html_page) with a navigation bar, forms with labels,
and the package's own script; nothing is loaded from outside the package."""

from __future__ import annotations

from collections.abc import Iterable

from tunelab.runs.html_page import STYLE, esc

BASE = "/ui"  # where the UI lives: `tunelab ui` redirects / here, `tunelab serve --ui` mounts it here
PAGES = [("runs", "Runs"), ("train", "Train"), ("evaluate", "Evaluate"), ("playground", "Playground"),
         ("serve", "Serve"), ("review", "Review"), ("monitor", "Monitor")]

# Additions to the reports' stylesheet for what only the UI has: navigation, forms, the live chart, chat panes.
UI_STYLE = """
nav { display: flex; flex-wrap: wrap; gap: 0.2em; border-bottom: 2px solid #4c78a8; margin-bottom: 1em; }
nav a { padding: 0.4em 0.8em; text-decoration: none; color: #224; border-radius: 4px 4px 0 0; }
nav a.here { background: #4c78a8; color: #fff; }
nav .who { margin-left: auto; padding: 0.4em; color: #555; }
a:focus, button:focus, input:focus, select:focus, textarea:focus { outline: 3px solid #f0a020; outline-offset: 1px; }
form.box, div.box { border: 1px solid #ccc; padding: 0.8em; margin: 0.8em 0; border-radius: 4px; }
.field { display: flex; flex-direction: column; margin: 0.4em 0; max-width: 100%; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-end; }
label { font-weight: 600; font-size: 0.9em; }
input, select, textarea, button { font: inherit; max-width: 100%; box-sizing: border-box; }
textarea { width: 100%; }
button { padding: 0.35em 0.9em; border: 1px solid #4c78a8; background: #eef5ff; border-radius: 4px; cursor: pointer; }
button.danger { border-color: #c62828; background: #fdecea; }
.status { font-weight: 600; } .status.running { color: #4c78a8; } .status.finished { color: #18794e; }
.status.failed, .status.stopped { color: #c62828; }
.panes { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 1em; }
.pane { border: 1px solid #ccc; border-radius: 4px; padding: 0.6em; min-width: 0; }
.pane pre { min-height: 4em; background: #fafafa; }
.badge { display: inline-block; padding: 0 0.5em; border-radius: 3px; font-size: 0.85em; }
.badge.ok { background: #e3f4ea; color: #18794e; } .badge.bad { background: #fdecea; color: #c62828; }
svg.chart { width: 100%; max-width: 900px; height: 300px; border: 1px solid #ddd; background: #fff; }
ul.tree { list-style: none; padding-left: 1.2em; border-left: 1px dashed #aaa; }
.missing { background: #fff8e1; border-left: 4px solid #f0a020; padding: 0.6em; }
"""


def nav(here: str, who: str) -> str:
    links = "".join(f'<a href="{BASE}/{name}"{" class=here aria-current=page" if name == here else ""}>{esc(label)}</a>'
                    for name, label in PAGES)
    return f'<nav aria-label="pages">{links}<span class="who">{esc(who)}</span></nav>'


def ui_page(title: str, here: str, who: str, body: Iterable[str], script: bool = True) -> str:
    """A whole UI page: the reports' stylesheet plus the UI's, the navigation bar, `body`, the UI script."""
    tail = f'<script src="{BASE}/static/ui.js"></script>' if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)} · tunelab</title><link rel=icon href=\"data:,\">"
            f"<style>{STYLE}{UI_STYLE}</style></head><body>\n{nav(here, who)}<main>\n<h1>{esc(title)}</h1>\n"
            + "\n".join(body) + f"\n</main>{tail}\n</body></html>\n")


def field(label: str, name: str, control: str = "input", value: object = "", kind: str = "text",
          options: Iterable[tuple[str, str]] = (), extra: str = "") -> str:
    """A labelled form control (input, select or textarea) with id `f-<name>`."""
    fid = f"f-{name}"
    if control == "select":
        opts = "".join(f'<option value="{esc(v)}"{" selected" if str(v) == str(value) else ""}>{esc(t)}</option>'
                       for v, t in options)
        inner = f'<select id="{fid}" name="{esc(name)}" {extra}>{opts}</select>'
    elif control == "textarea":
        inner = f'<textarea id="{fid}" name="{esc(name)}" rows="4" {extra}>{esc(value)}</textarea>'
    else:
        inner = f'<input id="{fid}" name="{esc(name)}" type="{kind}" value="{esc(value)}" {extra}>'
    return f'<div class="field"><label for="{fid}">{esc(label)}</label>{inner}</div>'


def button(text: str, cls: str = "", extra: str = "") -> str:
    return f'<button type="submit"{f" class={cls}" if cls else ""} {extra}>{esc(text)}</button>'


def missing(what: str) -> str:
    """A notice that a page's data source is not there (yet)."""
    return f'<p class="missing">{esc(what)}</p>'


def url(*parts: object) -> str:
    """A UI address: url("runs", 3) is /ui/runs/3."""
    return "/".join([BASE, *map(str, parts)])


def link(href: str, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'
