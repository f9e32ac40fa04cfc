"""Serve and Monitor: pages over the production loop (tunelab.ops: the request log, rollouts, the monitor) and
the serving service when the UI runs inside `tunelab serve`. A tenant sees only its own rows."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tunelab.evaluate.scoring import bootstrap_ci
from tunelab.runs.html_page import esc, score_td, table, td
from tunelab.server.auth import Tenant
from tunelab.ui import ops_views
from tunelab.ui.access import admin_of, ctx, tenant_of, who
from tunelab.ui.shell import BASE, missing, ui_page

router = APIRouter()
WINDOW_S = 24 * 3600
VERDICTS = {"accept": 1.0, "correct": 0.5, "reject": 0.0}  # review label -> feedback score


def request_log(request: Request):
    """The request log the server writes (the server's own store, the UI's --log, or the default file)."""
    return ctx(request).requests()


def _scope(t: Tenant) -> str | None:
    return None if t.admin else t.name


def _rate(values: list[bool]) -> str:
    if not values:
        return '<td class="num">-</td>'
    return score_td(sum(values) / len(values), bootstrap_ci([float(v) for v in values]), f"n={len(values)}")


def traffic(rows: list) -> list[list[str]]:
    """Per served model: requests, share cut at max tokens, share flagged by output checks (with 95% CIs), and
    latency p50 / p95."""
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r.adapter or f"{r.model} (base)", []).append(r)
    out = []
    for name, rs in sorted(by.items()):
        lat = sorted(r.latency_s for r in rs)
        p50, p95 = (lat[min(len(lat) - 1, int(q * len(lat)))] for q in (0.5, 0.95))
        out.append([td(name, ""), td(len(rs)), _rate([r.outcome == "length_closed" for r in rs]),
                    _rate([bool(r.flags) for r in rs]), td(f"{p50:.3f} s"), td(f"{p95:.3f} s")])
    return out


def _service_part(request: Request, t: Tenant) -> list[str]:
    service = ctx(request).service  # only one already running: the Serve page never loads a model
    if service is None:
        return [missing("No server in this process: run `tunelab serve --ui` to see resident adapters and the "
                        "queue here. The traffic below is read from the request log.")]
    a = service.adapters
    names = [n for n in a.available() if t.may_use(n)]
    rows = [[td(n, ""), td("yes" if n in a.resident else "", ""), td("yes" if n in a.pinned else "", ""),
             td(a.slots.get(n, "")), td(a.using.get(n, 0))] for n in names]
    return [f"<p>Base {esc(service.base_name)}; queue depth {service.scheduler.depth()}; adapter loads {a.loads}, "
            f"evictions {a.evictions}.</p>", table(["adapter", "resident", "pinned", "slot", "in use"], rows)]


def _tenants_part(request: Request, t: Tenant) -> list[str]:
    keys = ctx(request).access.keys
    if keys is None:
        return ['<p class="note">No keys file: one open tenant.</p>']
    tenants = {x.name: x for x in keys.by_hash.values() if t.admin or x.name == t.name}
    rows = [[td(n, ""), td("admin" if x.admin else "", ""), td(", ".join(sorted(x.adapters or [])) or "all", "")]
            for n, x in sorted(tenants.items())]
    return [table(["tenant", "role", "adapters"], rows)]


def _adapter_root(request: Request):
    service = ctx(request).service
    return getattr(getattr(getattr(service, "adapters", None), "root", None), "path", None)


def _rollout_part(request: Request, t: Tenant) -> list[str]:
    from tunelab.ops.rollout import versions_in

    service = ctx(request).service
    root = getattr(getattr(service, "adapters", None), "root", None)
    served = {a: list(vs) for a, vs in versions_in(root).items()}
    return ops_views.rollout_section(t, ctx(request).requests().url, served)


@router.post("/serve/rollout/{alias}")
async def rollout_change(alias: str, request: Request, t: Tenant = Depends(admin_of)):
    form = await request.form()
    ops_views.change_rollout(alias, form.get("action") or "", dict(form), _adapter_root(request), f"ui:{t.name}")
    return RedirectResponse(f"{BASE}/serve", status_code=303)


@router.get("/serve", response_class=HTMLResponse)
def serve_page(request: Request, t: Tenant = Depends(tenant_of)):
    body = ["<h2>Tenants</h2>", *_tenants_part(request, t), "<h2>Adapters</h2>", *_service_part(request, t)]
    body.append("<h2>Traffic, last 24 h</h2>")
    rows = request_log(request).rows(tenant=_scope(t), since=time.time() - WINDOW_S)
    body.append(table(["served", "requests", "cut at max tokens [95% CI]", "flagged [95% CI]", "latency p50",
                       "latency p95"], traffic(rows)) if rows else '<p class="note">No logged requests.</p>')
    body += ["<h2>Canary rollouts</h2>", *_rollout_part(request, t)]
    return ui_page("Serve", "serve", who(t), body)


def _hours(rows: list) -> list[list[str]]:
    """Per adapter and hour: requests, the share cut at max tokens and the share flagged, with 95% CIs."""
    by: dict[tuple[str, str], list] = {}
    for r in rows:
        by.setdefault((r.adapter or f"{r.model} (base)", time.strftime("%Y-%m-%d %H:00", time.gmtime(r.ts))),
                      []).append(r)
    return [[td(a, ""), td(h, ""), td(len(rs)), _rate([r.outcome == "length_closed" for r in rs]),
             _rate([bool(r.flags) for r in rs])] for (a, h), rs in sorted(by.items())]


@router.get("/monitor", response_class=HTMLResponse)
def monitor_page(request: Request, t: Tenant = Depends(tenant_of)):
    rows = request_log(request).rows(tenant=_scope(t), since=time.time() - 7 * WINDOW_S)
    body = []
    body += ops_views.monitor_reports(t)
    body += ["<h2>Output signals by hour (last 7 days, UTC)</h2>",
             table(["served", "hour", "requests", "cut at max tokens [95% CI]", "flagged [95% CI]"], _hours(rows))
             if rows else '<p class="note">No logged requests.</p>']
    return ui_page("Monitor", "monitor", who(t), body)



@router.get("/monitor/report/{adapter}", response_class=HTMLResponse)
def monitor_report(adapter: str, t: Tenant = Depends(tenant_of)):
    """The report.html `tunelab monitor ADAPTER --html` wrote last."""
    from tunelab.ops.monitor import monitor_dir
    from tunelab.runs.layout import REPORT_HTML

    path = monitor_dir(adapter) / REPORT_HTML
    if "/" in adapter or not t.may_use(adapter) or not path.is_file():
        raise HTTPException(404, f"no monitor report for {adapter!r} you may see")
    return HTMLResponse(path.read_text(encoding="utf-8"))
