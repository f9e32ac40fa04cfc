"""Evaluate and decide: the registry's evals (score with its 95% CI) and ladders, their HTML reports as written,
and two evals side by side with paired deltas (the eval compare report's numbers)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse

from tunelab.errors import TunelabError
from tunelab.evaluate.report import build, load_run, render_html
from tunelab.ladder.report import LADDER_HTML
from tunelab.runs import layout, list_artifacts, show
from tunelab.runs.html_page import esc, score_td, table, td
from tunelab.server.auth import Tenant
from tunelab.ui.access import tenant_of, visible_ids, who
from tunelab.ui.shell import BASE, button, field, link, ui_page, url

router = APIRouter()


def _visible(t: Tenant, kind: str) -> list[dict]:
    ids = visible_ids(t)
    return [r for r in list_artifacts(kind) if ids is None or r["id"] in ids]


def _eval_row(r: dict) -> list[str]:
    meta = show(r["id"]).get("meta") or {}
    primary = meta.get("primary_metric")
    cell = (meta.get("metrics") or {}).get(primary) or {}
    return [f'<td class="num">{r["id"]}</td>', td(r.get("task") or "", ""), td(r.get("split") or "", ""),
            td(meta.get("model") or r["name"] or "", ""), td(primary or "", ""),
            score_td(cell.get("score"), cell.get("ci95"), f"n={meta.get('n')}" if meta.get("n") else ""),
            f'<td>{link(url("evaluate/report", r["id"]), "report")} · {link(url("runs", r["id"]), "lineage")}</td>']


@router.get("/evaluate", response_class=HTMLResponse)
def evaluate_page(request: Request, t: Tenant = Depends(tenant_of)):
    evals = _visible(t, "eval")
    options = [(str(r["id"]), f"{r['id']}: {r['name']}") for r in evals]
    body = ["<h2>Compare two evals</h2>",
            f'<form class="box" method="get" action="{BASE}/evaluate/compare"><div class="row">'
            + field("Baseline eval", "a", "select", options[1][0] if len(options) > 1 else "", options=options)
            + field("Other eval", "b", "select", options[0][0] if options else "", options=options)
            + button("Compare") + "</div></form>",
            "<h2>Evals</h2>",
            table(["id", "task", "split", "model", "primary metric", "score [95% CI]", ""],
                  [_eval_row(r) for r in evals]) if evals else '<p class="note">No evals registered yet.</p>']
    ladders = _visible(t, "ladder")
    if ladders:
        body += ["<h2>Ladders</h2><ul>"] + [f'<li>{link(url("evaluate/report", r["id"]), r["name"] or r["path"])}</li>'
                                            for r in ladders] + ["</ul>"]
    return ui_page("Evaluate and decide", "evaluate", who(t), body)


def _artifact(t: Tenant, aid: int, kinds: tuple[str, ...]) -> dict:
    ids = visible_ids(t)
    try:
        d = show(aid)
    except TunelabError as e:
        raise HTTPException(404, str(e)) from None
    if (ids is not None and aid not in ids) or d["kind"] not in kinds:
        raise HTTPException(404, f"no {'/'.join(kinds)} {aid} you may see")
    return d


@router.get("/evaluate/report/{aid}", response_class=HTMLResponse)
def report(aid: int, t: Tenant = Depends(tenant_of)):
    """The report as `tunelab eval` or `tunelab ladder` wrote it (the one look of html_page)."""
    d = _artifact(t, aid, ("eval", "ladder"))
    folder = Path(d["path"])
    names = (LADDER_HTML, layout.REPORT_HTML) if d["kind"] == "ladder" else (layout.REPORT_HTML,)
    for candidate in [folder / n for n in names] + [folder.parent / layout.REPORT_HTML]:
        if candidate.is_file():
            return HTMLResponse(candidate.read_text(encoding="utf-8"))
    if d["kind"] == "eval":  # an eval folder without its report: build it from the folder
        return HTMLResponse(render_html(build([load_run(folder)])))
    raise HTTPException(404, f"{folder} holds no report HTML")


def compared(t: Tenant, a: int, b: int) -> dict:
    """The eval compare report's data for baseline `a` and eval `b` (deltas with paired-bootstrap CIs)."""
    runs = [load_run(Path(_artifact(t, x, ("eval",))["path"])) for x in (a, b)]
    return build(runs)


@router.get("/evaluate/compare", response_class=HTMLResponse)
def compare(a: int, b: int, full: bool = False, t: Tenant = Depends(tenant_of)):
    data = compared(t, a, b)
    if full:
        return HTMLResponse(render_html(data))
    rows = []
    for m in data["table"]:
        base, other = m["cells"]
        d = m["deltas"][0]
        ci = d and d.get("ci95")
        sign = "" if d is None else ("pos" if ci and ci[0] > 0 else "neg" if ci and ci[1] < 0 else "")
        delta = ('<td class="num">-</td>' if d is None else score_td(d["delta"], ci, "paired 95% CI" if ci else
                                                                      "unpaired").replace('class="num"', f'class="num {sign}"', 1))
        rows.append([td(m["metric"], ""), score_td((base or {}).get("score"), (base or {}).get("ci95")),
                     score_td((other or {}).get("score"), (other or {}).get("ci95")), delta])
    labels = data["labels"]
    body = [f"<p>Task {esc(data['task'])}, split {esc(data['split'])}, n={esc(data['n'])}; baseline "
            f"<b>{esc(labels[0])}</b>. A delta is green when its whole 95% CI is above zero, red when below.</p>",
            table(["metric", f"{labels[0]} (baseline)", labels[1], "delta [95% CI]"], rows),
            f'<p>{link(f"{BASE}/evaluate/compare?a={a}&b={b}&full=1", "The full compare report (failure classes, flips, samples)")}</p>']
    return ui_page(f"Compare eval {a} and {b}", "evaluate", who(t), body)
