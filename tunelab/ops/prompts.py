"""Versioned prompts: a task's system prompt and template, few-shot sets and the system prompt an alias serves with,
registered in the runs registry by content hash, like datasets and recipes.

A prompt's version is the first 12 hex digits of the sha256 of its text (a few-shot set: its examples as
sorted-key JSON), the same key training runs and evals register their prompts under (role:sha256), so an
eval's metrics.json (`provenance.prompts`) and `runs lineage` name the same version. An alias's system
prompt is a `prompt_alias` row per alias, linked to the prompt it serves now ("now") and to the one before
("previous"): setting a new one is a change `runs lineage ALIAS` shows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs.record import sha256_text
from tunelab.runs.registry import connect, link, row_dict, upsert, write_txn

ROLES = ("system", "template", "few_shot", "alias_system")
ALIAS_KIND = "prompt_alias"


@dataclass
class PromptVersion:
    role: str
    version: str  # sha256[:12] of the text
    sha256: str
    id: int | None = None  # the registry row

    def to_dict(self) -> dict:
        return {"role": self.role, "version": self.version, "sha256": self.sha256, "id": self.id}


def prompt_text(content) -> str:
    """The text a prompt is hashed by: a string as is, a few-shot set as sorted-key JSON."""
    return content if isinstance(content, str) else json.dumps(content, sort_keys=True, ensure_ascii=False)


def prompt_version(content) -> str:
    return sha256_text(prompt_text(content))[:12]


def _upsert(conn, role: str, content, name: str | None = None) -> PromptVersion:
    if role not in ROLES:
        raise TunelabError(f"prompt role {role!r}: one of {', '.join(ROLES)}.")
    text = prompt_text(content)
    if not text.strip():
        raise TunelabError(f"an empty {role} prompt has no version; give its text.")
    sha = sha256_text(text)
    pid = upsert(conn, "prompt", f"{role}:{sha}", name=name or role, hash=sha, meta={"text": text, "role": role})
    return PromptVersion(role, sha[:12], sha, pid)


def register_prompt(role: str, content, name: str | None = None, db: str | Path | None = None) -> PromptVersion:
    """Register one prompt (text, or a few-shot list of examples) by its hash; registering it again is a no-op."""
    conn = connect(db)
    try:
        with write_txn(conn):
            return _upsert(conn, role, content, name)
    finally:
        conn.close()


def register_task_prompts(task, shots: list[dict] = (), db: str | Path | None = None) -> dict[str, PromptVersion]:
    """Register a task's system prompt, prompt template and (when given) few-shot set; role -> version."""
    parts = {"system": task.spec.system_prompt, "template": task.spec.prompt_template,
             "few_shot": list(shots) or None}
    conn = connect(db)
    try:
        with write_txn(conn):
            return {role: _upsert(conn, role, content, f"{task.name}/{role}")
                    for role, content in parts.items() if content}
    finally:
        conn.close()


def set_alias_prompt(alias: str, text: str, db: str | Path | None = None) -> PromptVersion:
    """Make `text` the system prompt `alias` serves with: registered by hash, the alias row pointing at it
    ("now") and at the prompt it replaces ("previous"), the change kept in the alias row's history."""
    conn = connect(db)
    try:
        with write_txn(conn):
            pv = _upsert(conn, "alias_system", text, f"{alias}/system")
            cur = conn.execute("SELECT id, meta FROM artifacts WHERE kind = ? AND key = ?", (ALIAS_KIND, alias)).fetchone()
            meta = json.loads(cur["meta"]) if cur else {}
            history = list(meta.get("history") or [])
            if history and history[-1]["version"] == pv.version:
                return pv
            history.append({"version": pv.version, "at": time.time()})
            prev_id = None
            if cur:
                prev = conn.execute("SELECT parent FROM edges WHERE child = ? AND role = 'now'", (cur["id"],)).fetchone()
                prev_id = prev[0] if prev else None
            aid = upsert(conn, ALIAS_KIND, alias, name=alias, hash=pv.sha256,
                         meta={"alias": alias, "version": pv.version, "history": history})
            link(conn, aid, [("now", pv.id), *([("previous", prev_id)] if prev_id else [])])
            return pv
    finally:
        conn.close()


def alias_prompt(alias: str, db: str | Path | None = None) -> dict | None:
    """{alias, version, text, history} of the system prompt `alias` serves with now; None when none is set."""
    conn = connect(db)
    try:
        row = conn.execute("SELECT * FROM artifacts WHERE kind = ? AND key = ?", (ALIAS_KIND, alias)).fetchone()
        if row is None:
            return None
        d = row_dict(row)
        text = conn.execute("SELECT a.meta FROM edges e JOIN artifacts a ON a.id = e.parent WHERE e.child = ? "
                            "AND e.role = 'now'", (d["id"],)).fetchone()
    finally:
        conn.close()
    return {"alias": alias, "version": d["meta"]["version"], "history": d["meta"]["history"],
            "text": json.loads(text[0])["text"] if text else None, "id": d["id"]}
