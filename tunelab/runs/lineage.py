"""Questions to the registry: list, show, compare evals, lineage (walk back) and depends-on (walk forward).

Lineage and depends-on are recursive CTEs over the `edges` table (child -> parent with a role).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs.layout import KINDS
from tunelab.runs.registry import connect, find, row_dict

# what must be rebuilt when a base model changes (evals of them are listed with all_kinds=True)
REBUILD_KINDS = ("adapter", "model", "merge", "export", "index")

_UP = """
WITH RECURSIVE up(id) AS (
  SELECT ?
  UNION
  SELECT e.parent FROM edges e JOIN up ON e.child = up.id
)
SELECT e.child, e.parent, e.role FROM edges e WHERE e.child IN (SELECT id FROM up) ORDER BY e.role, e.parent
"""

_DOWN = """
WITH RECURSIVE down(id, depth) AS (
  SELECT id, 0 FROM artifacts WHERE id IN ({seeds})
  UNION
  SELECT e.child, down.depth + 1 FROM edges e JOIN down ON e.parent = down.id WHERE down.depth < 64
)
SELECT a.*, MIN(down.depth) AS depth FROM down JOIN artifacts a ON a.id = down.id
WHERE down.depth > 0 GROUP BY a.id ORDER BY depth, a.id
"""


def _brief(d: dict) -> dict:
    return {k: d.get(k) for k in ("id", "kind", "name", "path", "hash", "created_at")}


def list_artifacts(kind: str | None = None, limit: int | None = None, db: str | Path | None = None) -> list[dict]:
    """Registry rows (newest first), optionally of one kind; evals carry task, split and primary score."""
    if kind is not None and kind not in KINDS:
        raise TunelabError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}.")
    conn = connect(db)
    try:
        sql = "SELECT * FROM artifacts" + (" WHERE kind = ?" if kind else "") + " ORDER BY id DESC"
        rows = conn.execute(sql + (f" LIMIT {int(limit)}" if limit else ""), (kind,) if kind else ()).fetchall()
    finally:
        conn.close()
    out = []
    for r in rows:
        d = row_dict(r)
        item = _brief(d)
        if d["kind"] == "eval":
            item.update({k: d["meta"].get(k) for k in ("task", "split", "primary_metric", "primary_score")})
        out.append(item)
    return out


def show(ref: str | int, db: str | Path | None = None) -> dict:
    """One artifact with its meta, what it was made from (parents) and what was made from it (children)."""
    conn = connect(db)
    try:
        d = find(conn, ref)
        parents = conn.execute("SELECT e.role, a.* FROM edges e JOIN artifacts a ON a.id = e.parent "
                               "WHERE e.child = ? ORDER BY e.role", (d["id"],)).fetchall()
        children = conn.execute("SELECT e.role, a.* FROM edges e JOIN artifacts a ON a.id = e.child "
                                "WHERE e.parent = ? ORDER BY a.id", (d["id"],)).fetchall()
    finally:
        conn.close()
    d["made_from"] = [{"role": r["role"], **_brief(dict(r))} for r in parents]
    d["used_by"] = [{"role": r["role"], **_brief(dict(r))} for r in children]
    return d


def compare(refs: list[str | int], db: str | Path | None = None) -> dict:
    """Evals side by side: {"evals": [{id, name, task, split, model}], "metrics": {metric: [score or None]}}."""
    if not refs:
        raise TunelabError("tunelab runs compare needs at least one eval (id or folder).")
    conn = connect(db)
    try:
        evals = [find(conn, r, ("eval",)) for r in refs]
    finally:
        conn.close()
    names = sorted({m for e in evals for m in (e["meta"].get("metrics") or {})})
    metrics = {m: [(e["meta"].get("metrics") or {}).get(m, {}).get("score") for e in evals] for m in names}
    failures = sorted({f for e in evals for f in (e["meta"].get("failures") or {})})
    heads = [{**_brief(e), **{k: e["meta"].get(k) for k in ("task", "split", "model", "n", "primary_metric")}}
             for e in evals]
    roles = sorted({r for e in evals for r in (e["meta"].get("prompts") or {})})
    return {"evals": heads, "metrics": metrics,
            "failures": {f: [(e["meta"].get("failures") or {}).get(f, 0) for e in evals] for f in failures},
            "prompts": {r: [(e["meta"].get("prompts") or {}).get(r) for e in evals] for r in roles}}


def lineage(ref: str | int, db: str | Path | None = None) -> dict:
    """Walk back from an artifact (adapter, eval, merge, ...) to what made it: a nested tree
    {id, kind, name, path, hash, role, parents: [...]} down to base models, datasets, recipes and prompts."""
    conn = connect(db)
    try:
        start = find(conn, ref)
        edges = conn.execute(_UP, (start["id"],)).fetchall()
        ids = {start["id"]} | {e["parent"] for e in edges}
        arts = {r["id"]: _brief(dict(r)) for r in conn.execute(
            f"SELECT * FROM artifacts WHERE id IN ({','.join('?' * len(ids))})", sorted(ids)).fetchall()}
    finally:
        conn.close()
    parents: dict[int, list[tuple[str, int]]] = {}
    for e in edges:
        parents.setdefault(e["child"], []).append((e["role"], e["parent"]))

    def node(aid: int, role: str | None, seen: frozenset) -> dict:
        n = {**{k: arts[aid][k] for k in ("id", "kind", "name", "path", "hash")}, "role": role, "parents": []}
        if aid not in seen:  # a cycle would be a registry bug; stop rather than loop
            n["parents"] = [node(pid, r, seen | {aid}) for r, pid in parents.get(aid, [])]
        return n

    return node(start["id"], None, frozenset())


def roots(tree: dict) -> dict[str, list[dict]]:
    """Flatten a lineage tree to the things it ends at, by kind (base_model, dataset, recipe, prompt)."""
    out: dict[str, list[dict]] = {}
    stack = [tree]
    while stack:
        n = stack.pop()
        if not n["parents"] and n is not tree:
            if all(x["id"] != n["id"] for x in out.get(n["kind"], [])):
                out.setdefault(n["kind"], []).append({k: n[k] for k in ("id", "name", "path", "hash", "role")})
        stack.extend(n["parents"])
    return out


def depends_on(base: str, all_kinds: bool = False, db: str | Path | None = None) -> dict:
    """Everything built on a base model (spec, path, hash or id), transitively: the adapters, full models,
    merges, exports (and indexes) to redo when it changes; all_kinds adds runs and evals."""
    conn = connect(db)
    try:
        p = Path(base).expanduser()
        seeds = [r["id"] for r in conn.execute(
            "SELECT id FROM artifacts WHERE kind = 'base_model' AND (name = ? OR hash = ? OR key = ? OR path = ? "
            "OR CAST(id AS TEXT) = ? OR json_extract(meta, '$.hub_id') = ?)",
            (base, base, base, str(p.resolve()), base, base)).fetchall()]
        if not seeds:
            known = [r[0] for r in conn.execute("SELECT DISTINCT name FROM artifacts WHERE kind = 'base_model'")]
            raise TunelabError(f"no base model {base!r} in the registry; registered base models: "
                               f"{', '.join(map(str, known)) or 'none yet'}.")
        rows = conn.execute(_DOWN.format(seeds=",".join("?" * len(seeds))), seeds).fetchall()
    finally:
        conn.close()
    keep = None if all_kinds else set(REBUILD_KINDS)
    items = [{**_brief(dict(r)), "depth": r["depth"]} for r in rows if keep is None or r["kind"] in keep]
    return {"base": base, "base_ids": seeds, "artifacts": items}
