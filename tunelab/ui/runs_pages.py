"""The Runs page: the registry filtered by kind, task, method and base; one artifact's recipe, data hashes, files
and lineage graph; and the actions (evaluate, export, merge) started as the same `tunelab` commands."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tunelab.errors import TunelabError
from tunelab.runs import layout, lineage, list_artifacts, roots, show
from tunelab.runs.html_page import esc, img, table, td
from tunelab.server.auth import Tenant
from tunelab.ui import jobs
from tunelab.ui.access import admin_of, ctx, tenant_of, visible_ids, who
from tunelab.ui.shell import BASE, button, field, link, ui_page, url

router = APIRouter()
LIMIT = 300  # rows the list reads (newest first)
ADAPTER_KINDS = ("adapter", "model")


def facts(aid: int) -> dict:
    """What an artifact ends at (its lineage roots): base model, task or dataset, recipe; plus its method."""
    r = roots(lineage(aid))
    d = show(aid)
    meta = d.get("meta") or {}
    task = meta.get("task") or next((x["name"] for x in r.get("dataset", []) if x.get("name")), None)
    return {"base": ", ".join(sorted({x["name"] or "?" for x in r.get("base_model", [])})), "task": task or "",
            "method": meta.get("method") or "", "row": d, "roots": r}


def listing(tenant: Tenant, kind: str = "", task: str = "", method: str = "", base: str = "") -> tuple[list, dict]:
    """(rows the filters keep, {filter: values seen}); each row: the registry's brief row and its facts."""
    ids = visible_ids(tenant)
    rows = [r for r in list_artifacts(limit=LIMIT) if ids is None or r["id"] in ids]
    seen: dict[str, set] = {"kind": set(), "task": set(), "method": set(), "base": set()}
    out = []
    for r in rows:
        f = facts(r["id"])
        values = {"kind": r["kind"], "task": f["task"], "method": f["method"], "base": f["base"]}
        for k, v in values.items():
            if v:
                seen[k].add(v)
        if all(not want or values[k] == want for k, want in
               (("kind", kind), ("task", task), ("method", method), ("base", base))):
            out.append((r, values))
    return out, {k: sorted(v) for k, v in seen.items()}


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request, kind: str = "", task: str = "", method: str = "", base: str = "",
              t: Tenant = Depends(tenant_of)):
    rows, seen = listing(t, kind, task, method, base)
    chosen = {"kind": kind, "task": task, "method": method, "base": base}
    filters = "".join(field(k.capitalize(), k, "select", chosen[k], options=[("", "any")] + [(v, v) for v in vals])
                      for k, vals in seen.items())
    form = (f'<form class="box" method="get" action="{BASE}/runs"><div class="row">{filters}'
            f'{button("Filter")}</div></form>')
    cells = [[f'<td class="num"><a href="{BASE}/runs/{r["id"]}">{r["id"]}</a></td>', td(r["kind"], ""),
              td(r["name"] or "", ""), td(v["method"], ""), td(v["task"], ""), td(v["base"], ""),
              td(r["created_at"], "")] for r, v in rows]
    body = [form, f'<p class="note">{len(rows)} of the registry\'s newest {LIMIT} rows.</p>',
            table(["id", "kind", "name", "method", "task", "base", "created"], cells)]
    return ui_page("Runs", "runs", who(t), body)


def _tree(node: dict) -> str:
    label = f"{node['role'] + ': ' if node.get('role') else ''}{node['kind']} {node['name'] or ''}"
    inner = "".join(_tree(p) for p in node["parents"])
    return (f'<li><a href="{BASE}/runs/{node["id"]}">{esc(label)}</a>'
            f'{f"<ul class=tree>{inner}</ul>" if inner else ""}</li>')


def _files(path: str | None) -> str:
    folder = Path(path or "")
    if not path or not folder.is_dir():
        return ""
    files = sorted(p for p in folder.iterdir() if p.is_file())[:60]
    rows = [[td(p.name, ""), td(f"{p.stat().st_size:,}")] for p in files]
    return "<h2>Files</h2>" + table(["file", "bytes"], rows)


def _actions(d: dict, base: str) -> str:
    """Forms for what the CLI does with an adapter: evaluate on a task, export, merge into its base."""
    from tunelab.tasks import tasks_table

    tasks = [(x["name"], x["name"]) for x in tasks_table()]
    a = f"{BASE}/runs/{d['id']}/action"
    return ("<h2>Actions</h2><div class=row>"
            f'<form class="box" method="post" action="{a}"><input type=hidden name=action value=eval>'
            + field("Task", "task", "select", tasks[0][0] if tasks else "", options=tasks)
            + field("Examples (limit)", "limit", value="32", kind="number", extra="min=1")
            + button("Evaluate") + "</form>"
            f'<form class="box" method="post" action="{a}"><input type=hidden name=action value=export>'
            + field("Format", "format", "select", "hf", options=[(x, x) for x in ("hf", "gguf", "gguf-lora", "vllm")])
            + button("Export") + "</form>"
            f'<form class="box" method="post" action="{a}"><input type=hidden name=action value=merge>'
            f'<p>Merge into its base ({esc(base)}): a full HF model folder.</p>' + button("Merge") + "</form></div>")


def _row(t: Tenant, aid: int) -> dict:
    ids = visible_ids(t)
    if ids is not None and aid not in ids:
        raise HTTPException(404, f"no artifact {aid} you may see")
    try:
        return facts(aid)
    except TunelabError as e:
        raise HTTPException(404, str(e)) from None


@router.get("/runs/{aid}", response_class=HTMLResponse)
def run_page(aid: int, request: Request, t: Tenant = Depends(tenant_of)):
    f = _row(t, aid)
    d = f["row"]
    head = [[td(k, ""), td(d.get(k) or "", "")] for k in ("kind", "name", "path", "hash", "created_at")]
    data = [[td(role, ""), td(x["name"] or "", ""), td((x["hash"] or "")[:16], "")]
            for role, items in f["roots"].items() for x in items]
    body = [table(["field", "value"], head), "<h2>Made from (data hashes, recipe, base)</h2>",
            table(["kind", "name", "sha256"], data),
            f"<h2>Lineage</h2><ul class=tree>{_tree(lineage(aid))}</ul>"]
    if d.get("used_by"):
        body.append("<h2>Used by</h2><ul>" + "".join(
            f"<li>{esc(u['role'])}: {link(url('runs', u['id']), str(u['kind']) + ' ' + str(u['name']))}</li>"
            for u in d["used_by"]) + "</ul>")
    png = Path(d.get("path") or "") / layout.LOSS_PNG
    if png.is_file():
        import base64

        body.append("<h2>Loss</h2>" + img(base64.b64encode(png.read_bytes()).decode(), "training loss"))
    if d["kind"] == "eval":
        body.append(f'<p>{link(f"{BASE}/evaluate/report/{aid}", "Open the eval report")}</p>')
    recipe = Path(d.get("path") or "") / layout.RECIPE_YAML
    if d.get("path") and recipe.is_file():
        body.append(f"<h2>Recipe</h2><pre>{esc(recipe.read_text(encoding='utf-8'))}</pre>")
    body.append(f"<h2>Summary</h2><pre>{esc(json.dumps(d.get('meta'), indent=2, default=str))}</pre>")
    body.append(_files(d.get("path")))
    if t.admin and d["kind"] in ADAPTER_KINDS and d.get("path"):
        body.append(_actions(d, _base_of(f)))
    return ui_page(f"{d['kind']} {d['name'] or aid}", "runs", who(t), body)


def _base_of(f: dict) -> str:
    bases = f["roots"].get("base_model") or [{}]
    b = bases[0]
    return b.get("path") if b.get("path") and Path(b["path"]).exists() else (b.get("name") or "")


@router.post("/runs/{aid}/action")
def run_action(aid: int, request: Request, action: str = Form(...), task: str = Form(""), limit: int = Form(32),
               format: str = Form("hf"), t: Tenant = Depends(admin_of)):
    f = _row(t, aid)
    d = f["row"]
    if d["kind"] not in ADAPTER_KINDS:
        raise HTTPException(400, "actions apply to adapters and models")
    name, root = d["name"] or str(aid), ctx(request).runs_root.resolve()
    if action == "eval":
        out = root / f"eval-{name}-{task}"
        args = ["eval", "--task", task, "--limit", str(limit), "--out", str(out)]
        args += ["--model", _base_of(f), "--adapter", d["path"]] if d["kind"] == "adapter" else ["--model", d["path"]]
    elif action == "export":
        out = root / f"export-{name}-{format}"
        args = ["export", d["path"], "--out", str(out), "--format", format]
    elif action == "merge":
        out = root / f"merged-{name}"
        args = ["merge", d["path"], "--unload", "--out", str(out)]
    else:
        raise HTTPException(400, f"unknown action {action!r}: eval, export or merge")
    job = jobs.launch(action, args, out, {"artifact": aid})
    return RedirectResponse(f"{BASE}/jobs/{job.id}", status_code=303)
