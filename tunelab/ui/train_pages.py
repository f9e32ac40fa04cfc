"""The Train page: a task or an uploaded JSONL (checked like `tunelab data check`), a recipe and overrides, the
memory estimate and lint findings before starting; then the run's own page with the live loss and validation
curves read from its training log, stop and resume."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import UploadFile

from tunelab.config.paths import DEFAULT_MODEL, tunelab_home
from tunelab.errors import TunelabError
from tunelab.runs import layout
from tunelab.runs.html_page import esc, table, td
from tunelab.server.auth import Tenant
from tunelab.ui import jobs
from tunelab.ui.context import admin_of, ctx, who
from tunelab.ui.shell import BASE, button, field, ui_page

router = APIRouter()
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _recipes() -> list[tuple[str, str]]:
    found = sorted(Path("recipes").glob("*.yaml")) if Path("recipes").is_dir() else []
    return [("", "(defaults)")] + [(str(p), p.name) for p in found]


def _tasks() -> list[tuple[str, str]]:
    from tunelab.tasks import tasks_table

    return [("", "(my uploaded JSONL)")] + [(t["name"], f"{t['name']}: {t['description'][:60]}")
                                             for t in tasks_table()]


def _form(v: dict) -> str:
    fields = [
        '<div class="row">',
        field("Run name", "name", value=v.get("name", ""), extra='required pattern="[A-Za-z0-9][A-Za-z0-9._\\-]*"'),
        field("Base model", "model", value=v.get("model") or DEFAULT_MODEL),
        field("Recipe", "recipe", "select", v.get("recipe", ""), options=_recipes()),
        "</div>", '<div class="row">',
        field("Task", "task", "select", v.get("task", ""), options=_tasks()),
        field("Upload training data (JSONL)", "upload", kind="file", extra='accept=".jsonl,.json"'),
        f'<input type="hidden" name="data_path" value="{esc(v.get("data_path", ""))}">',
        "</div>",
        field("Overrides (key=value, one a line)", "overrides", "textarea", v.get("overrides", "")),
        field("Train even if the checks find errors", "force", kind="checkbox",
              extra="value=1" + (" checked" if v.get("force") else "")),
        '<div class="row">', button("Check data, memory and recipe", extra=f'formaction="{BASE}/train/check"'),
        button("Start training", extra=f'formaction="{BASE}/train/start"'), "</div>",
    ]
    note = (f'<p class="note">Data now: {esc(v["data_path"])}</p>' if v.get("data_path") else "")
    return (f'<form class="box" method="post" enctype="multipart/form-data" action="{BASE}/train/check" '
            'data-keep="train">'
            + "".join(fields) + note + "</form>")


def _jobs_table() -> str:
    rows = [[f'<td><a href="{BASE}/jobs/{esc(j.id)}">{esc(j.id)}</a></td>', td(j.kind, ""),
             f'<td><span class="status {jobs.status(j)}">{jobs.status(j)}</span></td>', td(j.out, "")]
            for j in jobs.all_jobs()[:30]]
    return "<h2>Jobs</h2>" + (table(["job", "kind", "status", "output"], rows) if rows else
                              '<p class="note">No jobs yet.</p>')


async def _values(request: Request) -> dict:
    """The form's fields (an uploaded file saved under $TUNELAB_HOME/ui/uploads, content-addressed)."""
    form = await request.form()
    v = {k: form.get(k) or "" for k in ("name", "model", "recipe", "task", "data_path", "overrides", "force")}
    up = form.get("upload")
    if isinstance(up, UploadFile) and up.filename:
        data = await up.read()
        folder = tunelab_home() / "ui" / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(up.filename).name)
        path = folder / f"{hashlib.sha256(data).hexdigest()[:12]}-{safe}"
        path.write_bytes(data)
        v["data_path"], v["task"] = str(path), ""
    return v


def _overrides(v: dict, out: Path) -> list[str]:
    data = [f"data.task={v['task']}"] if v["task"] else ["data.task=null", f"data.train={v['data_path']}"]
    if not v["task"] and not v["data_path"]:
        raise TunelabError("pick a task, or upload a JSONL file of training rows.")
    user = [ln.strip() for ln in v["overrides"].splitlines() if ln.strip()]
    return [f"model.spec={v['model'] or DEFAULT_MODEL}", *data, f"output_dir={out}", *user]


def _out(request: Request, v: dict) -> Path:
    if not NAME.fullmatch(v["name"] or ""):
        raise TunelabError("Run name: letters, digits, '.', '_' and '-' (it names the run's folder).")
    return (ctx(request).runs_root / v["name"]).resolve()


def check(v: dict, out: Path) -> tuple[list[str], bool]:
    """What the Start button would meet: the data check, lint findings and the memory estimate, as HTML
    sections; and whether any is an error."""
    from tunelab.config.recipe import load_recipe
    from tunelab.memory import estimate_recipe
    from tunelab.memory.units import gib
    from tunelab.plan.lint import available_memory, preflight

    parts, bad = [], False
    if v["data_path"] and not v["task"]:
        from tunelab.data import check_file
        from tunelab.models import load_tokenizer

        try:
            r = check_file(v["data_path"], load_tokenizer(v["model"] or DEFAULT_MODEL))
            lines = [f"{r.rows} rows ({r.format}); tokens p50/p90/p99/max: "
                     + "/".join(str(x) for x in (r.lengths or {}).values())]
            lines += [f"duplicate: line {a} repeats line {b}" for a, b in r.duplicate_lines]
            lines += [f"empty reply: line {n}" for n in r.empty_lines]
            lines += [f"longer than {r.max_length} tokens: line {n}" for n in r.too_long_lines]
            parts.append(f'<h2>Data check</h2><p class="badge {"ok" if r.ok else "bad"}">'
                         f'{"ok" if r.ok else "problems"}</p><pre>{esc(chr(10).join(lines))}</pre>')
        except TunelabError as e:
            return [f'<h2>Data check</h2><p class="why">{esc(e)}</p>'], True
    recipe = load_recipe(v["recipe"] or None, _overrides(v, out))
    dev, budget = available_memory()
    findings = preflight(recipe)
    bad = bad or any(f.level == "error" for f in findings)
    rows = [[td(f.level, ""), td(f.code, ""), td(f.message, ""), td(f.fix, "")] for f in findings]
    parts.append("<h2>Lint</h2>" + (table(["level", "code", "finding", "fix"], rows) if rows else
                                    '<p class="badge ok">no findings</p>'))
    e = estimate_recipe(recipe, device=dev)
    rows = [[td(k, ""), td(gib(b))] for k, b in e.bytes.items()]
    total = e.bytes.get("total", 0)
    fits = "fits" if total <= budget else "does not fit: see the lint finding's fix"
    parts.append(f"<h2>Memory estimate</h2><p class=\"verdict\">{esc(gib(total))} at its peak ({esc(e.peak)}) of "
                 f"{esc(gib(budget))} available on this {esc(dev)}: {esc(fits)}</p>" + table(["component", "bytes"], rows))
    return parts, bad


@router.get("/train", response_class=HTMLResponse)
def train_page(request: Request, t: Tenant = Depends(admin_of)):
    return ui_page("Train", "train", who(t), [_form({}), _jobs_table()])


@router.post("/train/check", response_class=HTMLResponse)
async def train_check(request: Request, t: Tenant = Depends(admin_of)):
    v = await _values(request)
    try:
        parts, _ = check(v, _out(request, v))
    except TunelabError as e:
        parts = [f'<p class="why">{esc(e)}</p>']
    return ui_page("Train", "train", who(t), [_form(v), *parts])


@router.post("/train/start")
async def train_start(request: Request, t: Tenant = Depends(admin_of)):
    v = await _values(request)
    parts: list[str] = []
    try:
        out = _out(request, v)
        if (out / layout.RECIPE_YAML).exists() or (out / layout.RUN_JSON).exists():
            raise TunelabError(f"{out} already holds a run: choose another run name.")
        parts, bad = check(v, out)
        if bad and not v["force"]:
            raise TunelabError("the checks below found errors: fix them, or tick 'Train even if ...'.")
    except TunelabError as e:
        return HTMLResponse(ui_page("Train", "train", who(t), [_form(v), f'<p class="why">{esc(e)}</p>', *parts]),
                            status_code=400)
    args = ["train", *([v["recipe"]] if v["recipe"] else []), *_overrides(v, out), *(["--force"] if v["force"] else [])]
    job = jobs.launch("train", args, out)
    return RedirectResponse(f"{BASE}/jobs/{job.id}", status_code=303)
