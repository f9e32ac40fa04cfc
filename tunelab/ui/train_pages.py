"""The Train page: a task or an uploaded JSONL (checked like `tunelab data check`), a recipe and overrides, the
memory estimate and lint findings before starting; then the run's own page with the live loss and validation
curves read from its training log, stop and resume."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import UploadFile

from tunelab.config.paths import DEFAULT_MODEL, tunelab_home
from tunelab.errors import TunelabError
from tunelab.runs import layout
from tunelab.runs.html_page import esc, table, td
from tunelab.server.auth import Tenant
from tunelab.ui import jobs
from tunelab.ui.access import admin_of, ctx, who
from tunelab.ui.shell import BASE, button, field, link, ui_page, url

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


# --- a job's page: the live chart, stop and resume --------------------------------------------------------
def _job(job_id: str) -> jobs.Job:
    try:
        return jobs.load(job_id)
    except TunelabError as e:
        raise HTTPException(404, str(e)) from None


def state(job: jobs.Job) -> dict:
    """What the job page shows: status, the training log's rows (steps with loss, validations), the planned
    steps when known, the output folder's state and the output's last lines."""
    rows = layout.read_train_log(job.out) if job.kind == "train" else []
    st = jobs.status(job)
    return {"id": job.id, "kind": job.kind, "status": st, "command": job.command(), "out": job.out,
            "loss": [[r["step"], r["loss"]] for r in rows if "loss" in r],
            "val_loss": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r],
            "finished_run": layout.is_run_folder(job.out), "resumes": job.resumes,
            "can_resume": job.kind == "train" and st in ("stopped", "failed")
            and (Path(job.out) / layout.RECIPE_YAML).is_file(),
            "log": jobs.log_tail(job, 25)}


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, t: Tenant = Depends(admin_of)):
    job = _job(job_id)
    s = state(job)
    body = [
        f'<p>Status: <span id="job-status" class="status {s["status"]}">{s["status"]}</span> '
        f'<span class="note">(this page reads the run folder every second; closing it does not stop the run)</span></p>',
        f'<p><code>{esc(s["command"])}</code></p><p>Output: <code>{esc(s["out"])}</code></p>',
        '<div class="row">',
        f'<form method="post" action="{BASE}/jobs/{esc(job.id)}/stop">{button("Stop", "danger", "id=stop")}</form>',
        f'<form method="post" action="{BASE}/jobs/{esc(job.id)}/resume">{button("Resume", "", "id=resume")}</form>',
        "</div>",
    ]
    if job.kind == "train":
        body += ['<h2>Loss</h2><svg id="chart" class="chart" role="img" aria-label="training loss and '
                 'validation loss by step" viewBox="0 0 900 300" preserveAspectRatio="none"></svg>',
                 '<p class="note"><span style="color:#4c78a8">&#9632;</span> training loss '
                 '<span style="color:#f58518">&#9632;</span> validation loss · '
                 '<span id="points">0</span> points</p>']
    found = results(job) if s["status"] != "running" else []
    if found:
        body.append("<h2>Results</h2><ul>" + "".join(f"<li>{link(u, text)}</li>" for text, u in found) + "</ul>")
    body += ['<h2>Output</h2><pre id="job-log"></pre>',
             f'<script id="job-data" type="application/json">{esc_json(s)}</script>']
    return ui_page(f"Job {job.id}", "train", who(t), body)


def results(job: jobs.Job) -> list[tuple[str, str]]:
    """What a finished job registered: (label, UI address) of the registry rows in its output folder (the
    adapter a training wrote, an eval's reports, an export or merge)."""
    from tunelab.runs import list_artifacts

    out = str(Path(job.out).resolve())
    rows = [r for r in list_artifacts(limit=500) if r["path"] and (r["path"] == out or r["path"].startswith(out + "/"))
            and r["kind"] not in ("run",)]
    return [(f"eval report: {r['name']}", url("evaluate/report", r["id"])) if r["kind"] == "eval" else
            (f"{r['kind']} {r['name']} (lineage, actions)", url("runs", r["id"])) for r in rows]


def esc_json(obj) -> str:
    """JSON for a <script type=application/json> block (no "</" inside)."""
    return json.dumps(obj).replace("</", "<\\/")


@router.get("/api/jobs/{job_id}")
def job_api(job_id: str, t: Tenant = Depends(admin_of)) -> dict:
    return state(_job(job_id))


@router.post("/jobs/{job_id}/stop")
def job_stop(job_id: str, t: Tenant = Depends(admin_of)):
    jobs.stop(_job(job_id))
    return RedirectResponse(f"{BASE}/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/resume")
def job_resume(job_id: str, t: Tenant = Depends(admin_of)):
    try:
        jobs.resume(_job(job_id))
    except TunelabError as e:
        raise HTTPException(409, str(e)) from None
    return RedirectResponse(f"{BASE}/jobs/{job_id}", status_code=303)
