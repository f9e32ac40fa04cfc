"""Canary rollouts: adapter aliases with versions, their weights in the registry, the sticky choice of a version
per caller, promote and rollback (one transaction each, with lineage), and the comparison of the versions.

A served version is an adapter folder named NAME@vN in the server's adapter root; a request for model NAME goes
to one of them. Which one is `pick`ed from the alias's weights (`tunelab rollout set NAME v1=90 v2=10`, or the
server's admin API) by a hash of the caller (the request's `user`, else its API key), so one caller keeps one
version while the weights stay. Until weights are set, the lowest version serves everything. The weights live in
the run registry (tables `rollouts` and `rollout_events`), which every change also records as a `rollout`
artifact linked to the adapters it serves and to the change before it: `tunelab runs lineage NAME` walks back
through which version served when. `status` compares each canary with the stable version on the request log's
signals with an always-valid test (tunelab.ops.sequential).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.ops.sequential import compare_rollout
from tunelab.runs.adapter_folder import ADAPTER_NAME, AdapterRoot
from tunelab.runs.registry import connect, upsert, write_txn
from tunelab.runs.registry import link as link_edges

log = logging.getLogger(__name__)
VERSION = re.compile(r"v[1-9][0-9]{0,5}")
ACTIONS = ("set", "promote", "rollback")


def split_version(model: str) -> tuple[str, str | None]:
    """"orders@v2" -> ("orders", "v2"); "orders" -> ("orders", None)."""
    alias, _, version = model.partition("@")
    return (alias, version) if version and VERSION.fullmatch(version) else (model, None)


def _number(version: str) -> int:
    return int(version[1:])


def sticky_key(authorization: str | None, user: str | None) -> str | None:
    """Who a request comes from, for a sticky version: its `user` field when given, else its API key (hashed;
    None without either: that request's version is drawn at random)."""
    if user:
        return "user:" + hashlib.sha256(user.encode()).hexdigest()
    if authorization and authorization.lower().startswith("bearer ") and authorization[7:].strip():
        return "key:" + hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
    return None


def pick(alias: str, sticky: str | None, weights: dict[str, float]) -> str:
    """The version of `alias` a caller gets: the caller's hash, a number in [0, 1), falls in one version's share
    of the weights laid end to end in version order. Moving weight to a later version (90/10 -> 50/50) moves
    only callers onto it, never off it."""
    versions = sorted((v for v, w in weights.items() if w > 0), key=_number)
    if not versions:
        raise TunelabError(f"rollout {alias!r} gives no version any weight.")
    total = sum(weights[v] for v in versions)
    if sticky is None:
        u = random.random()
    else:
        u = int.from_bytes(hashlib.sha256(f"{alias}\0{sticky}".encode()).digest()[:8], "big") / 2.0 ** 64
    acc, point = 0.0, u * total
    for v in versions:
        acc += weights[v]
        if point < acc:
            return v
    return versions[-1]


def parse_weights(items: list[str] | dict[str, float]) -> dict[str, float]:
    """["v1=90", "v2=10"] (or a mapping) -> {"v1": 90.0, "v2": 10.0} in percent, summing to 100."""
    pairs = items.items() if isinstance(items, dict) else [_pair(s) for s in items]
    out: dict[str, float] = {}
    for version, weight in pairs:
        if not VERSION.fullmatch(str(version)):
            raise TunelabError(f"rollout weight {version}={weight}: versions are v1, v2, ... (the adapter folders "
                               "NAME@v1, NAME@v2 in the server's adapter root).")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            w = -1.0
        if not w >= 0 or w == float("inf"):
            raise TunelabError(f"rollout weight {version}={weight}: a weight is a number >= 0.")
        out[str(version)] = w
    total = sum(out.values())
    if total <= 0:
        raise TunelabError("rollout weights: give at least one version a weight above 0, e.g. v1=90 v2=10.")
    return {v: round(100.0 * w / total, 6) for v, w in sorted(out.items(), key=lambda kv: _number(kv[0]))}


def _pair(text: str) -> tuple[str, str]:
    version, sep, weight = text.partition("=")
    if not sep:
        raise TunelabError(f"rollout weight {text!r}: write VERSION=WEIGHT, e.g. v1=90 v2=10.")
    return version.strip(), weight.strip()


def weights_text(weights: dict[str, float]) -> str:
    return " ".join(f"{v}={w:g}" for v, w in weights.items())


def versions_in(root: AdapterRoot | None) -> dict[str, dict[str, Path]]:
    """The aliases an adapter root serves: alias -> {version: folder}, versions in order."""
    out: dict[str, dict[str, Path]] = {}
    for name, folder in (root.scan().found.items() if root is not None else ()):
        alias, version = split_version(name)
        if version:
            out.setdefault(alias, {})[version] = folder
    return {a: dict(sorted(vs.items(), key=lambda kv: _number(kv[0]))) for a, vs in out.items()}


# --- the registry's state ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    """An alias's rollout now: the weights (percent), the version a rollback returns to, since when the current
    comparison runs (a new canary's first weight, a promote or a rollback)."""

    alias: str
    weights: dict[str, float]
    stable: str
    root: str | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    event: dict = field(default_factory=dict)  # the change that made it (from `history`)


def _row(r) -> Rollout:
    return Rollout(r["alias"], json.loads(r["weights"]), r["stable"], r["root"], r["started_at"], r["updated_at"])


def get(alias: str, db: str | Path | None = None) -> Rollout | None:
    """The alias's rollout in the registry, None when none was set."""
    conn = connect(db)
    try:
        r = conn.execute("SELECT * FROM rollouts WHERE alias = ?", (alias,)).fetchone()
    finally:
        conn.close()
    return _row(r) if r else None


def all_weights(db: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Every alias's weights (what a server routes by)."""
    conn = connect(db)
    try:
        return {r["alias"]: json.loads(r["weights"]) for r in conn.execute("SELECT alias, weights FROM rollouts")}
    finally:
        conn.close()


def history(alias: str, db: str | Path | None = None) -> list[dict]:
    """Every change to the alias's weights, oldest first: {id, action, weights, previous, stable, actor, at,
    artifact} (at: unix seconds; artifact: its `rollout` row in the registry)."""
    conn = connect(db)
    try:
        rows = conn.execute("SELECT * FROM rollout_events WHERE alias = ? ORDER BY id", (alias,)).fetchall()
    finally:
        conn.close()
    return [{**dict(r), "weights": json.loads(r["weights"]),
             "previous": json.loads(r["previous"]) if r["previous"] else None} for r in rows]


def set_weights(alias: str, weights: list[str] | dict[str, float], *, root: str | Path | None = None,
                actor: str = "cli", db: str | Path | None = None) -> Rollout:
    """Route `alias` by `weights` from now on (e.g. ["v1=90", "v2=10"]). root: the server's adapter root, to
    check the versions exist and link them in the lineage (remembered for the alias)."""
    new = parse_weights(weights)

    def change(cur: Rollout | None) -> tuple[dict, str, bool]:
        live = [v for v, w in new.items() if w > 0]
        stable = cur.stable if cur is not None and new.get(cur.stable, 0) > 0 else \
            max(live, key=lambda v: (new[v], -_number(v)))
        fresh = cur is None or any(cur.weights.get(v, 0) <= 0 for v in live)  # a version newly given traffic
        return new, stable, fresh

    return _change(alias, "set", change, root, actor, db)


def promote(alias: str, version: str, *, root: str | Path | None = None, actor: str = "cli",
            db: str | Path | None = None) -> Rollout:
    """Send all of `alias`'s traffic to `version` and make it the stable one (one transaction)."""
    _check_version(version)
    return _change(alias, "promote", lambda cur: ({version: 100.0}, version, True), root, actor, db)


def rollback(alias: str, version: str | None = None, *, root: str | Path | None = None, actor: str = "cli",
             db: str | Path | None = None) -> Rollout:
    """Send all of `alias`'s traffic back to its stable version (or `version`), in one transaction."""
    if version is not None:
        _check_version(version)

    def change(cur: Rollout | None) -> tuple[dict, str, bool]:
        if cur is None and version is None:
            raise TunelabError(f"rollout {alias!r} was never set, so it has no stable version to roll back to; "
                               f"name one: tunelab rollout rollback {alias} v1.")
        target = version or cur.stable
        return {target: 100.0}, target, True

    return _change(alias, "rollback", change, root, actor, db)


def _check_version(version: str) -> None:
    if not VERSION.fullmatch(version):
        raise TunelabError(f"{version!r} is not a version: give v1, v2, ... (folders NAME@v1, NAME@v2).")


def _folders(alias: str, root: str | Path | None, versions: list[str]) -> dict[str, tuple[str, str | None]]:
    """version -> (folder, weights sha256) of the versions in `root`; a TunelabError for one that is missing."""
    if root is None:
        return {}
    found = versions_in(AdapterRoot(root)).get(alias, {})
    missing = [v for v in versions if v not in found]
    if missing:
        raise TunelabError(f"no adapter folder {', '.join(f'{alias}@{v}' for v in missing)} in {root} (it has: "
                           f"{', '.join(f'{alias}@{v}' for v in found) or 'no versions of ' + alias}); copy the "
                           "adapter there first.")
    from tunelab.runs import layout
    from tunelab.runs.record import record_training_run

    out = {}
    for v in versions:
        folder = found[v].resolve()
        if layout.is_run_folder(folder):  # a trained run: register it, so the lineage reaches its data and base
            try:
                record_training_run(folder)
            except Exception as e:  # noqa: BLE001 - the rollout still applies; its lineage stops at the adapter
                log.warning(f"could not register {folder} in the run registry ({e})")
        weights = folder / layout.ADAPTER_WEIGHTS
        out[v] = (str(folder), layout.file_sha256(weights) if weights.is_file() else None)
    return out


def _change(alias: str, action: str, change, root, actor: str, db) -> Rollout:
    """Apply `change(current) -> (weights, stable, restart)` to `alias` in one registry transaction: the
    state, the event and its lineage rows commit together or not at all."""
    if "@" in alias or not ADAPTER_NAME.fullmatch(alias):
        raise TunelabError(f"{alias!r} is not an alias: give the name without @vN (folders NAME@v1, NAME@v2).")
    conn = connect(db)
    try:
        cur = _current(conn, alias)
        root = str(Path(root).resolve()) if root is not None else (cur.root if cur else None)
        weights, _, _ = change(cur)
        folders = _folders(alias, root, [v for v, w in weights.items() if w > 0])  # before the write lock
        with write_txn(conn):
            cur = _current(conn, alias)  # again, under the lock: another writer may have changed it
            weights, stable, restart = change(cur)
            at = time.time()
            started = at if restart or cur is None else cur.started_at
            conn.execute("INSERT INTO rollouts (alias, weights, stable, root, started_at, updated_at) VALUES "
                         "(?, ?, ?, ?, ?, ?) ON CONFLICT (alias) DO UPDATE SET weights = excluded.weights, "
                         "stable = excluded.stable, root = excluded.root, started_at = excluded.started_at, "
                         "updated_at = excluded.updated_at",
                         (alias, json.dumps(weights), stable, root, started, at))
            ev = conn.execute("INSERT INTO rollout_events (alias, action, weights, previous, stable, actor, at) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (alias, action, json.dumps(weights), json.dumps(cur.weights) if cur else None, stable,
                               actor, at)).lastrowid
            art = _lineage(conn, alias, ev, action, weights, stable, folders, at)
            conn.execute("UPDATE rollout_events SET artifact = ? WHERE id = ?", (art, ev))
            new = _current(conn, alias)
    finally:
        conn.close()
    return Rollout(new.alias, new.weights, new.stable, new.root, new.started_at, new.updated_at,
                   {"id": ev, "action": action, "actor": actor, "at": at, "artifact": art})


def _current(conn, alias: str) -> Rollout | None:
    r = conn.execute("SELECT * FROM rollouts WHERE alias = ?", (alias,)).fetchone()
    return _row(r) if r else None


def _lineage(conn, alias: str, ev: int, action: str, weights: dict, stable: str, folders: dict, at: float) -> int:
    """The change as a `rollout` artifact: linked to the adapters it serves ("serves 90%") and to the change
    before it ("previous"); the alias's own row (key: the alias) points at it ("now")."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
    prev = conn.execute("SELECT artifact FROM rollout_events WHERE alias = ? AND id < ? ORDER BY id DESC LIMIT 1",
                        (alias, ev)).fetchone()
    parents = [("previous", prev[0] if prev else None)]
    parents += [(f"serves {w:g}%", _adapter_row(conn, alias, v, folders.get(v))) for v, w in weights.items() if w > 0]
    art = upsert(conn, "rollout", f"{alias}#{ev}", name=f"{alias} {action} {weights_text(weights)} at {when} UTC",
                 meta={"alias": alias, "action": action, "weights": weights, "stable": stable, "at": at})
    link_edges(conn, art, parents)
    head = upsert(conn, "rollout", alias, name=alias, meta={"weights": weights, "stable": stable, "at": at})
    link_edges(conn, head, {"now": art})
    return art


def _adapter_row(conn, alias: str, version: str, folder: tuple[str, str | None] | None) -> int | None:
    """The registry row of version `version`'s adapter: the folder's own row, else a registered adapter with the
    same weights (the folder is a copy of a trained one), else a new row for the folder; without the folder,
    the newest adapter registered under the name NAME@vN (None when there is none)."""
    name = f"{alias}@{version}"
    if folder is None:
        r = conn.execute("SELECT id FROM artifacts WHERE kind IN ('adapter', 'model') AND name = ? ORDER BY id DESC",
                         (name,)).fetchone()
        return r[0] if r else None
    path, sha = folder
    r = conn.execute("SELECT id FROM artifacts WHERE kind IN ('adapter', 'model') AND path = ?", (path,)).fetchone()
    if r is None and sha:
        r = conn.execute("SELECT id FROM artifacts WHERE kind IN ('adapter', 'model') AND hash = ? ORDER BY id",
                         (sha,)).fetchone()
    return r[0] if r else upsert(conn, "adapter", path, name=name, path=path, hash=sha, meta={"served_as": name})


# --- the comparison -------------------------------------------------------------------------------------------
def status(alias: str, *, log_url: str | Path | None = None, since: float | None = None, alpha: float = 0.05,
           tenant: str | None = None, db: str | Path | None = None) -> dict:
    """Compare the alias's canary with its stable version on the request log (`tunelab serve --log`; None: the
    file beside the registry) since the comparison began (or `since`, unix seconds): requests per version, each
    canary's comparison with the stable version, and promote, hold or rollback (tunelab.ops.sequential)."""
    from tunelab.ops.requestlog import RequestLog

    cur = get(alias, db)
    if cur is None:
        raise TunelabError(f"no rollout for {alias!r} in the registry; start one: tunelab rollout set {alias} "
                           "v1=90 v2=10.")
    since = cur.started_at if since is None else since
    store = RequestLog.open(log_url)
    try:
        rows = store.rows(model=alias, tenant=tenant, since=since)
        feedback = [f for f in store.feedback(model=alias, tenant=tenant, since=since)
                    if (f.get("response_ts") or since) >= since]
    finally:
        store.close()
    return compare_rollout(cur.alias, cur.weights, cur.stable, rows, feedback, since, alpha)


# --- the server's side --------------------------------------------------------------------------------------
class Router:
    """Which version of an alias a request gets, for one server: the versions are the adapter root's NAME@vN
    folders, the weights the registry's; both are re-read at most every `ttl_s` seconds, so a change from the
    CLI (or another replica's admin API) reaches the server within that. A registry that cannot be read keeps
    the weights last read (requests never fail for it)."""

    def __init__(self, root: AdapterRoot | None, db: str | Path | None = None, ttl_s: float = 0.5):
        self.root, self.db, self.ttl_s = root, db, ttl_s
        self._versions: dict[str, dict[str, Path]] = {}
        self._weights: dict[str, dict[str, float]] = {}
        self._scanned = self._read = -1e18

    def invalidate(self) -> None:
        """Re-read the folders and the weights at the next request (after a change through this server)."""
        self._scanned = self._read = -1e18

    def versions(self) -> dict[str, dict[str, Path]]:
        """alias -> {version: folder} in the adapter root (cached for ttl_s)."""
        now = time.monotonic()
        if now - self._scanned > self.ttl_s:
            self._versions, self._scanned = versions_in(self.root), now
        return self._versions

    def weights(self, alias: str) -> dict[str, float] | None:
        """The alias's weights in the registry (cached for ttl_s); None when none were set."""
        now = time.monotonic()
        if now - self._read > self.ttl_s:
            try:
                self._weights = all_weights(self.db)
            except Exception as e:  # noqa: BLE001 - route by the weights last read; never fail a request for it
                log.warning(f"could not read the rollout weights from the registry ({e}); keeping the last read")
            self._read = now
        return self._weights.get(alias)

    def resolve(self, model: str, sticky: str | None) -> str:
        """The adapter a request for `model` goes to: NAME@vN for an alias (a name with NAME@v* folders), else
        `model` itself. Versions the weights name but the root lacks are skipped; with none left (or no
        weights set), the lowest version serves."""
        if "@" in model:
            return model
        present = self.versions().get(model)
        if not present:
            return model
        weights = self.weights(model) or {}
        live = {v: w for v, w in weights.items() if w > 0 and v in present}
        if not live:
            live = {next(iter(present)): 1.0}
        return f"{model}@{pick(model, sticky, live)}"
