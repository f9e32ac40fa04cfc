"""Training rows from reviewed traffic: accepted and corrected answers become chat rows that say where they came from.

Each row is the logged conversation (redacted again, with the tenant's own patterns if given) followed by
the answer a reviewer accepted or wrote, with `origin`: the request ids, reviewers, verdicts and the adapter
that served them. Rows whose question the adapter's training data already holds are dropped; several
reviews of one question become one row (the latest answer, every origin). A question from the golden test
set is refused: training on it would inflate every later evaluation. The file is registered as a dataset
made from the adapter (and its training data) in the runs registry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.ops.redact import Redactor
from tunelab.ops.requestlog import RequestLog
from tunelab.ops.review import Reviewed, reviews
from tunelab.runs import layout


def question_key(text: str | None, redact: Redactor) -> str:
    """What makes two questions the same: the text redacted as the log redacts it, whitespace and case folded."""
    return re.sub(r"\s+", " ", redact(text or "") or "").strip().casefold()


@dataclass
class AdapterData:
    """What an adapter folder was trained on and is tested on (its run.json and recipe.yaml)."""

    folder: Path
    recipe: dict
    sources: dict  # run.json's data: role -> {path, sha256, task?}
    train: list[list[dict]] = field(default_factory=list)  # the training conversations
    validation: list[list[dict]] = field(default_factory=list)
    test: list[str] = field(default_factory=list)  # the golden test set's questions
    test_path: Path | None = None
    task: str | None = None


def _last_user(messages: list[dict]) -> str:
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


def adapter_data(folder: str | Path, test: str | Path | None = None) -> AdapterData:
    """Read what `folder` (a training run folder) was trained on; `test`: a golden test file (chat JSONL or a
    task folder) to use instead of the recorded task's test split."""
    from tunelab.data.read import read_chat_file
    from tunelab.tasks.task import load_task

    folder = Path(folder)
    if not layout.is_run_folder(folder):
        raise TunelabError(f"{folder} has no {layout.RUN_JSON}: the loop needs an adapter `tunelab train` wrote "
                           "(its recipe and data are what the next version retrains on).")
    info = layout.read_run_json(folder)
    recipe_path = folder / layout.RECIPE_YAML
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else \
        (info.get("recipe") or {})
    d = AdapterData(folder, recipe or {}, info.get("data") or {})
    task_name = (recipe.get("data") or {}).get("task") or next(
        (s.get("task") for s in d.sources.values() if s.get("task")), None)
    for role, src in d.sources.items():
        rows = d.validation if "validation" in role else d.train
        if src.get("task"):
            t = load_task(task_name or src["task"])
            rows += [t.messages(ex, with_answer=True) for ex in t.examples("validation" if "validation" in role
                                                                              else "train")]
        elif src.get("path") and Path(src["path"]).is_file():
            rows += read_chat_file(src["path"]).rows
    if test is not None and not Path(test).is_dir():
        d.test_path = Path(test)
        d.test = [_last_user(m) for m in read_chat_file(test).rows]
    elif test is not None or task_name:
        t = load_task(test or task_name)
        d.task, d.test_path = t.name, t.split_path("test")
        d.test = [t.prompt(ex) for ex in t.examples("test")]
    return d


@dataclass
class FromLogs:
    """What `from_logs` wrote and why rows were left out."""

    path: Path
    rows: list[dict]
    counts: dict
    dataset_id: int | None = None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "rows": len(self.rows), "counts": self.counts,
                "dataset_id": self.dataset_id}


def reviewed_rows(items: list[Reviewed], data: AdapterData, redact: Redactor,
                  drop_test_overlap: bool = False) -> tuple[list[dict], dict]:
    """Chat rows from accepted and corrected reviews, deduplicated against `data`'s training set and among
    themselves; a golden test question is an error (or dropped and counted with `drop_test_overlap`)."""
    counts = {"reviewed": len(items), "accept": 0, "correct": 0, "reject": 0, "no_prompt": 0,
              "in_train": 0, "merged": 0, "test_overlap": 0}
    seen_train = {question_key(_last_user(m), redact) for m in data.train}
    golden = {question_key(q, redact) for q in data.test}
    by_key: dict[str, dict] = {}
    overlap: list[str] = []
    for r in items:
        counts[r.verdict] += 1
        if r.answer is None:
            continue
        try:
            messages = json.loads(r.row.prompt or "")
        except ValueError:
            messages = None
        if not isinstance(messages, list) or not messages:
            counts["no_prompt"] += 1
            continue
        messages = [{**m, "content": redact(m.get("content"))} for m in messages if isinstance(m, dict)]
        key = question_key(_last_user(messages), redact)
        if key in golden:
            overlap.append(r.row.response_id)
            continue
        if key in seen_train:
            counts["in_train"] += 1
            continue
        origin = {"response_ids": [r.row.response_id], "reviewers": [r.reviewer], "verdicts": [r.verdict],
                  "adapter": r.row.adapter or r.row.model, "tenant": r.row.tenant}
        if key in by_key:  # the same question reviewed twice: the latest answer, both origins
            counts["merged"] += 1
            old = by_key[key]["origin"]
            origin = {**origin, **{k: old[k] + origin[k] for k in ("response_ids", "reviewers", "verdicts")}}
        by_key[key] = {"messages": messages + [{"role": "assistant", "content": redact(r.answer)}],
                       "origin": origin}
    counts["test_overlap"] = len(overlap)
    if overlap and not drop_test_overlap:
        where = data.test_path or "the golden test set"
        raise TunelabError(f"{len(overlap)} reviewed answer(s) ask a question of the golden test set {where} "
                           f"(response ids {', '.join(overlap[:5])}{' ...' if len(overlap) > 5 else ''}); training "
                           "on them would inflate every later evaluation. Leave them out with --drop-test-overlap.")
    return list(by_key.values()), counts


def register_dataset(path: Path, data: AdapterData, meta: dict, db: str | Path | None = None,
                     extra: dict[str, int | None] | None = None) -> int:
    """A dataset row for `path` (keyed by its content hash, as a training run reading it keys it), made from
    the adapter, the adapter's training files and `extra` (role -> registry id)."""
    from tunelab.runs.registry import connect, link, upsert, write_txn

    sha = layout.file_sha256(path)
    conn = connect(db)
    try:
        with write_txn(conn):
            parents: list[tuple[str, int]] = []
            row = conn.execute("SELECT id FROM artifacts WHERE kind IN ('adapter', 'model') AND path = ?",
                               (str(data.folder.resolve()),)).fetchone()
            if row:
                parents.append(("adapter", row[0]))
            for role, src in data.sources.items():
                found = conn.execute("SELECT id FROM artifacts WHERE kind = 'dataset' AND key = ?",
                                     (src.get("sha256") or "",)).fetchone()
                if found:
                    parents.append((f"adapter_{role}", found[0]))
            parents += [(role, pid) for role, pid in (extra or {}).items() if pid is not None]
            did = upsert(conn, "dataset", sha, name=path.name, path=str(path.resolve()), hash=sha,
                         meta={"path": str(path.resolve()), **meta})
            link(conn, did, parents)
    finally:
        conn.close()
    return did


def from_logs(adapter: str, folder: str | Path, out: str | Path, *, log: RequestLog, since: float | None = None,
              tenant: str | None = None, test: str | Path | None = None, redact_extra=(),
              drop_test_overlap: bool = False, register: bool = True) -> FromLogs:
    """Write `adapter`'s accepted and corrected answers (reviewed since `since`) to `out` as chat JSONL, and
    register it. `folder`: the adapter's run folder (its training data and golden test set)."""
    data = adapter_data(folder, test)
    redact = Redactor(redact_extra)
    rows, counts = reviewed_rows(reviews(log, adapter, tenant=tenant, since=since), data, redact, drop_test_overlap)
    if not rows:
        raise TunelabError(f"no accepted or corrected answers of {adapter!r} to write ({counts}); review some "
                           f"first: tunelab review {adapter}.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    layout.write_jsonl(out, rows)
    result = FromLogs(out, rows, counts)
    if register:
        result.dataset_id = register_dataset(out, data, {"rows": len(rows), "from_logs": {
            "adapter": adapter, "since": since, "counts": counts, "test": str(data.test_path)}})
    return result
