"""Work the UI starts (train, eval, export, merge): each a `tunelab ...` process of its own session, so it goes
on when the browser or the UI goes away; its record (command, pid, output folder, log) is a JSON file under
$TUNELAB_HOME/ui/jobs, and its state is read back from the process table and the files it writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.config.paths import tunelab_home
from tunelab.errors import TunelabError
from tunelab.runs import layout

_CHILDREN: dict[int, subprocess.Popen] = {}  # processes this UI started: polled so none stays a zombie
# `sh -c` runs the command, then writes its exit status; a killed process group leaves no status (stopped)
_WRAP = '"$@"; echo $? > "$0"'


def jobs_dir() -> Path:
    d = tunelab_home() / "ui" / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class Job:
    """One process the UI started: `tunelab ARGS`, writing into `out`."""

    id: str
    kind: str  # train | eval | export | merge
    args: list[str]
    out: str
    cwd: str
    pid: int = 0
    started: float = 0.0
    stop_requested: bool = False
    resumes: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def record(self) -> Path:
        return jobs_dir() / f"{self.id}.json"

    @property
    def log(self) -> Path:
        return jobs_dir() / f"{self.id}.log"

    @property
    def exit_file(self) -> Path:
        return jobs_dir() / f"{self.id}.exit"

    def save(self) -> None:
        layout.write_json(self.record, asdict(self))

    def command(self) -> str:
        return "tunelab " + " ".join(self.args)


def _alive(pid: int) -> bool:
    """The process runs (not a zombie): its group leader is what `stop` signals."""
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def status(job: Job) -> str:
    """running, finished (exit 0), failed (its exit status was not 0, or it vanished) or stopped (by the UI)."""
    if _alive(job.pid):
        return "running"
    if job.exit_file.is_file():
        text = job.exit_file.read_text().strip()
        return "finished" if text == "0" else "failed"
    return "stopped" if job.stop_requested else "failed"


def _spawn(job: Job) -> None:
    job.exit_file.unlink(missing_ok=True)
    log = open(job.log, "ab")  # noqa: SIM115 - the child keeps it; closed here right after the start
    try:
        log.write(f"\n$ {job.command()}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(["sh", "-c", _WRAP, str(job.exit_file), sys.executable, "-m", "tunelab", *job.args],
                                cwd=job.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    finally:
        log.close()
    _CHILDREN[proc.pid] = proc
    job.pid, job.started, job.stop_requested = proc.pid, time.time(), False
    job.save()


def launch(kind: str, args: list[str], out: str | Path, notes: dict | None = None) -> Job:
    """Start `tunelab ARGS` (writing into `out`) as a process of its own session; returns its record."""
    job = Job(id=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", kind=kind, args=list(args),
              out=str(Path(out).resolve()), cwd=str(Path.cwd()), notes=notes or {})
    _spawn(job)
    return job


def load(job_id: str) -> Job:
    """A job's record by id; a TunelabError naming the folder when there is none."""
    path = jobs_dir() / f"{job_id}.json"
    if "/" in job_id or not path.is_file():
        raise TunelabError(f"no UI job {job_id!r} in {jobs_dir()}.")
    return Job(**layout.read_json(path, "UI job record"))


def all_jobs() -> list[Job]:
    """Every job the UI started, newest first."""
    jobs = []
    for p in jobs_dir().glob("*.json"):
        try:
            jobs.append(Job(**json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue  # a record being written
    return sorted(jobs, key=lambda j: j.started, reverse=True)


def stop(job: Job, wait_s: float = 10.0) -> str:
    """Stop a running job (SIGTERM to its process group, SIGKILL after `wait_s`); returns its status."""
    job.stop_requested = True
    job.save()
    if _alive(job.pid):
        try:
            os.killpg(job.pid, signal.SIGTERM)
            deadline = time.time() + wait_s
            while _alive(job.pid) and time.time() < deadline:
                time.sleep(0.1)
            if _alive(job.pid):
                os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child = _CHILDREN.pop(job.pid, None)
        if child is not None:
            child.wait(timeout=wait_s)
    return status(job)


def resume(job: Job) -> Job:
    """Start a stopped or failed training job again from its latest checkpoint (`tunelab train RECIPE --resume`
    with the recipe the run saved)."""
    if job.kind != "train":
        raise TunelabError(f"job {job.id} is a {job.kind} job: only training resumes; start it again instead.")
    if status(job) == "running":
        raise TunelabError(f"job {job.id} is still running.")
    recipe = Path(job.out) / layout.RECIPE_YAML
    if not recipe.is_file():
        raise TunelabError(f"{recipe} is missing: the run stopped before it started; start a new one.")
    job.args = ["train", str(recipe), "--resume"]
    job.resumes += 1
    _spawn(job)
    return job


def log_tail(job: Job, lines: int = 40) -> str:
    """The last lines of the job's output (stdout and stderr)."""
    try:
        text = job.log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
