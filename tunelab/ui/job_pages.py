"""A job's page (a training run's live loss and validation chart, or an eval / export / merge in progress), its
JSON for the page's polling, and stop / resume. Everything shown is read from the job's record, its process
and the files it writes, so a reload or a second tab shows the same."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse

from tunelab.errors import TunelabError
from tunelab.runs import layout
from tunelab.runs.html_page import esc
from tunelab.server.auth import Tenant
from tunelab.ui import jobs
from tunelab.ui.context import admin_of, who
from tunelab.ui.shell import BASE, button, ui_page

router = APIRouter()


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
    body += ['<h2>Output</h2><pre id="job-log"></pre>',
             f'<script id="job-data" type="application/json">{esc_json(s)}</script>']
    return ui_page(f"Job {job.id}", "train", who(t), body)


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
