"""Register what train and eval wrote: read the artifact folder, upsert its rows and what it was made from.

Registration never breaks the workflow that calls it: `register_training_run` and `register_eval` warn
and return None on any failure (pass strict=True to raise instead, as the tests do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.runs import layout
from tunelab.runs.layout import file_sha256
from tunelab.runs.registry import connect, find, link, upsert, write_txn

log = logging.getLogger(__name__)
# Licenses of models known by hub id, for base models whose folder does not say (GGUF files, the bundled one)
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _count_rows(path: str | None) -> int | None:
    if not path or not Path(path).is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def model_license(identity: dict) -> str | None:
    """The license of a base model if known: recorded, README front matter, config.json, or KNOWN_LICENSES."""
    if identity.get("license"):
        return identity["license"]
    path = Path(identity["path"]) if identity.get("path") else None
    folder = path if path and path.is_dir() else (path.parent if path and path.name == "config.json" else None)
    if folder is not None:
        readme = folder / "README.md"
        if readme.is_file():
            m = re.match(r"---\s*\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
            front = yaml.safe_load(m.group(1)) if m else None
            if isinstance(front, dict) and front.get("license"):
                return str(front["license"])
        cfg = folder / "config.json"
        if cfg.is_file():
            lic = json.loads(cfg.read_text(encoding="utf-8")).get("license")
            if lic:
                return str(lic)
    return KNOWN_LICENSES.get(identity.get("hub_id") or "")


def _base_model(conn: sqlite3.Connection, identity: dict) -> int:
    """Upsert a base model, keyed by its weights hash (else its resolved path, else its spec)."""
    key = identity.get("hash") or identity.get("path") or identity["spec"]
    meta = {**identity, "license": model_license(identity)}
    return upsert(conn, "base_model", str(key), name=identity.get("spec"), path=identity.get("path"),
                  hash=identity.get("hash"), meta=meta)


def _dataset(conn: sqlite3.Connection, source: dict) -> int | None:
    """Upsert a dataset file {path, sha256, task?} keyed by its content hash."""
    sha = source.get("sha256")
    if not sha:
        return None
    meta = {"rows": _count_rows(source.get("path")), **{k: v for k, v in source.items() if k != "sha256"}}
    return upsert(conn, "dataset", sha, name=source.get("task") or Path(source.get("path") or sha).name,
                  path=source.get("path"), hash=sha, meta=meta)


def _prompt(conn: sqlite3.Connection, role: str, content) -> int | None:
    """Upsert a system prompt (text) or a few-shot set (list of examples) keyed by its content hash."""
    if not content:
        return None
    text = content if isinstance(content, str) else json.dumps(content, sort_keys=True, ensure_ascii=False)
    sha = sha256_text(text)
    return upsert(conn, "prompt", f"{role}:{sha}", name=role, hash=sha, meta={"text": text})


def _recipe(conn: sqlite3.Connection, folder: Path, recipe: dict) -> int | None:
    """Upsert the resolved recipe keyed by the hash of its content (output_dir left out)."""
    if not recipe:
        return None
    content = {k: v for k, v in recipe.items() if k != "output_dir"}
    sha = sha256_text(json.dumps(content, sort_keys=True))
    return upsert(conn, "recipe", sha, name=recipe.get("method"), path=str(folder / layout.RECIPE_YAML),
                  hash=sha, meta=recipe)


def _read_recipe(folder: Path, info: dict) -> dict:
    path = folder / layout.RECIPE_YAML
    if path.is_file():
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return info.get("recipe") or {}


def _adapter(conn: sqlite3.Connection, folder: Path, parents: dict[str, int | None], meta: dict) -> int:
    """Upsert the adapter (or full model) a folder holds, keyed by the folder path."""
    weights = layout.weights_file(folder)
    kind = "model" if weights is not None and weights.name == layout.MODEL_WEIGHTS else "adapter"
    aid = upsert(conn, kind, str(folder), name=folder.name, path=str(folder),
                 hash=file_sha256(weights) if weights else None, meta=meta)
    link(conn, aid, parents)
    return aid


def _record_training_run(conn: sqlite3.Connection, folder: Path) -> int:
    """Upsert a training run folder: base model, datasets, recipe, system prompt, the run, its adapter."""
    info = layout.read_run_json(folder)
    recipe = _read_recipe(folder, info)
    base = _base_model(conn, info["base_model"])
    parents: dict[str, int | None] = {"base_model": base, "recipe": _recipe(conn, folder, recipe),
                                      "system_prompt": _prompt(conn, "system", info.get("system_prompt"))}
    for role, source in (info.get("data") or {}).items():
        parents[role] = _dataset(conn, source)
    run_meta = {k: info.get(k) for k in ("method", "metrics", "wall_time_s", "peak_rss_bytes", "versions")}
    run = upsert(conn, "run", str(folder), name=folder.name, path=str(folder), meta=run_meta)
    link(conn, run, parents)
    return _adapter(conn, folder, {"run": run}, {"method": info.get("method")})


REGISTER_LATER = "the files are written; `tunelab runs register FOLDER` registers them later"


def _safely(what: str, fn, *args, strict: bool = False, hint: str = REGISTER_LATER, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a registry or tracker problem must not fail the train/eval it follows
        if strict:
            raise
        log.warning(f"warning: could not {what} ({e}); {hint}.")
        return None


@contextmanager
def _writing(db: str | Path | None) -> Iterator[sqlite3.Connection]:
    """A registry connection inside one write transaction (committed on success), closed after."""
    conn = connect(db)
    try:
        with write_txn(conn):
            yield conn
    finally:
        conn.close()


def record_training_run(folder: str | Path, db: str | Path | None = None) -> int:
    """Register a finished training run folder; returns the adapter (or model) row id. Raises on failure."""
    folder = Path(folder).resolve()
    with _writing(db) as conn:
        return _record_training_run(conn, folder)


def mirror_if_asked(folder: str | Path) -> str | None:
    """Mirror a run folder to the trackers its recipe.yaml names in `report_to`; the MLflow run id or None."""
    recipe = _read_recipe(Path(folder), {})
    if "mlflow" not in (recipe.get("report_to") or []):
        return None
    from tunelab.runs.tracking import mirror_to_mlflow

    return mirror_to_mlflow(folder, recipe.get("mlflow_tracking_uri"))


def register_training_run(folder: str | Path, strict: bool = False) -> int | None:
    """Register a finished run and mirror it to the recipe's trackers (train calls this last). On failure
    warn and go on (return None) unless strict."""
    aid = _safely(f"register {folder} in the run registry", record_training_run, folder, strict=strict)
    _safely(f"mirror {folder} to MLflow", mirror_if_asked, folder, strict=strict,
            hint="the run is trained and registered; check mlflow_tracking_uri in the recipe")
    return aid


def record_eval(folder: str | Path, system_prompt: str | None = None, few_shot: list | None = None,
                db: str | Path | None = None) -> int:
    """Register an eval folder: its base model, adapter, dataset, prompts, and metric summary. Raises."""
    folder = Path(folder).resolve()
    meta = layout.read_eval_metrics(folder)
    prov = meta.get("provenance") or {}
    adapter = Path(meta["adapter"]).resolve() if meta.get("adapter") else None
    with _writing(db) as conn:
        base = _base_model(conn, prov.get("base_model") or {"spec": str(meta.get("base_model"))})
        parents: dict[str, int | None] = {"base_model": base}
        if adapter is not None:
            if layout.is_run_folder(adapter):
                parents["adapter"] = _record_training_run(conn, adapter)
            else:  # an adapter made elsewhere: all we know is the base it was evaluated on
                parents["adapter"] = _adapter(conn, adapter, {"base_model": base}, {"external": True})
        parents["dataset"] = _dataset(conn, prov.get("data") or {})
        parents["system_prompt"] = _prompt(conn, "system", system_prompt)
        parents["few_shot"] = _prompt(conn, "few_shot", few_shot)
        primary = meta.get("primary_metric")
        summary = {k: meta.get(k) for k in ("task", "split", "model", "constrained", "few_shot", "n",
                                            "metrics", "failures", "primary_metric")}
        summary["primary_score"] = (meta.get("metrics") or {}).get(primary, {}).get("score")
        summary["prompts"] = prov.get("prompts")  # the prompt versions it used (system, template, few_shot)
        eid = upsert(conn, "eval", str(folder), name=f"{meta.get('task')}/{folder.name}", path=str(folder),
                     meta=summary)
        link(conn, eid, parents)
    return eid


def register_eval(folder: str | Path, system_prompt: str | None = None, few_shot: list | None = None,
                  strict: bool = False) -> int | None:
    """Register an eval folder (eval calls this per variant); on failure warn and return None unless strict."""
    return _safely(f"register the eval {folder} in the run registry", record_eval, folder, system_prompt, few_shot,
                   strict=strict)


def register_folder(kind: str, folder: str | Path, made_from: dict[str, str | int], meta: dict | None = None,
                    db: str | Path | None = None) -> int:
    """Register a merge/export/index/ladder folder: `made_from` maps a role to a registry ref (id, path, hash)."""
    if kind not in layout.KINDS:
        raise TunelabError(f"unknown artifact kind {kind!r}; one of {', '.join(layout.KINDS)}.")
    folder = Path(folder).resolve()
    with _writing(db) as conn:
        parents = {role: find(conn, ref)["id"] for role, ref in made_from.items()}
        weights = layout.weights_file(folder)
        aid = upsert(conn, kind, str(folder), name=folder.name, path=str(folder),
                     hash=file_sha256(weights) if weights else None, meta=meta or {})
        link(conn, aid, parents)
    return aid


def register_base_model(identity: dict, db: str | Path | None = None) -> int:
    """Register a base model by its `tunelab.models.identity` record (keyed as training runs key it)."""
    with _writing(db) as conn:
        return _base_model(conn, identity)


def record_index(folder: str | Path, db: str | Path | None = None) -> int:
    """Register one version folder of a retrieval index (its index.json): the corpus as a dataset row (keyed
    by its content hash), the embedder as a base model (keyed by its weights hash), the index keyed by folder."""
    folder = Path(folder).resolve()
    m = layout.read_json(folder / layout.INDEX_JSON, "index.json `tunelab rag index` writes")
    corpus, emb = m.get("corpus") or {}, m.get("embedder")
    with _writing(db) as conn:
        parents: dict[str, int | None] = {"corpus": _dataset(conn, corpus)}
        if emb:
            parents["embedder"] = upsert(conn, "base_model", emb["sha256"], name=emb["spec"], path=emb["path"],
                                         hash=emb["sha256"], meta={"spec": emb["spec"], "role": "embedder"})
        meta = {"version": m.get("version"), "retrieval": (m.get("retrieval") or {}).get("kind"),
                "chunks": m.get("chunks"), "chunking": m.get("chunking", {}).get("tokens"),
                "overlap": m.get("chunking", {}).get("overlap"), "corpus_sha256": corpus.get("sha256"),
                "embedder": emb["spec"] if emb else None, "store": (m.get("store") or {}).get("kind")}
        iid = upsert(conn, "index", str(folder), name=f"{folder.parent.name}/{folder.name}", path=str(folder),
                     hash=m.get("key"), meta=meta)
        link(conn, iid, parents)
    return iid


def register_index(folder: str | Path, strict: bool = False) -> int | None:
    """Register an index version (`rag index` calls this last); on failure warn and return None unless strict."""
    return _safely(f"register the index {folder} in the run registry", record_index, folder, strict=strict,
                   hint="the index is written; `tunelab runs register FOLDER` registers it later")


def record_distilled(path: str | Path, inputs: str | Path, teacher: dict, meta: dict | None = None,
                     db: str | Path | None = None) -> int:
    """Register a distilled dataset file: a dataset row keyed by its content hash (as a training run that reads
    it keys it), made from the prompts file (a dataset row) by the teacher (a base_model row: a local model
    by its weights hash, an endpoint by model@base_url) and, for a local teacher, its adapter. Raises."""
    path = Path(path).resolve()
    inputs = Path(inputs).resolve()
    with _writing(db) as conn:
        parents: dict[str, int | None] = {"prompts": _dataset(conn, {"path": str(inputs),
                                                                     "sha256": file_sha256(inputs)})}
        if teacher.get("source") == "openai":
            parents["teacher"] = upsert(conn, "base_model", f"{teacher['model']}@{teacher['base_url']}",
                                        name=f"openai:{teacher['model']}", meta={**teacher, "role": "teacher"})
        else:
            model = {k: v for k, v in teacher.items() if k not in ("source", "adapter", "adapter_sha256")}
            parents["teacher"] = _base_model(conn, model)
            if teacher.get("adapter"):
                adapter = Path(teacher["adapter"])
                parents["teacher_adapter"] = (
                    _record_training_run(conn, adapter) if layout.is_run_folder(adapter)
                    else _adapter(conn, adapter, {"base_model": parents["teacher"]}, {"external": True}))
        sha = file_sha256(path)
        did = upsert(conn, "dataset", sha, name=path.name, path=str(path), hash=sha,
                     meta={"rows": _count_rows(str(path)), "path": str(path), "teacher": teacher, **(meta or {})})
        link(conn, did, parents)
    return did


def register_distilled(path: str | Path, inputs: str | Path, teacher: dict, meta: dict | None = None,
                       strict: bool = False) -> int | None:
    """Register a distilled file (`data distill` calls this last); on failure warn and return None unless strict."""
    return _safely(f"register {path} in the run registry", record_distilled, path, inputs, teacher, meta,
                   strict=strict, hint="the file is written; the teacher is also recorded in each of its rows")


def register_any(folder: str | Path) -> int:
    """Register whatever artifact folder this is (training run or eval); for `tunelab runs register`."""
    kind = layout.folder_kind(folder)
    if kind == "run":  # not mirrored again: a finished run was mirrored when it finished
        return record_training_run(folder)
    if kind == "eval":
        return record_eval(folder)
    if kind == "index" and "key" in layout.read_json(Path(folder) / layout.INDEX_JSON):
        return record_index(folder)
    raise TunelabError(f"{folder} is neither a training run folder ({layout.RUN_JSON}), an eval folder "
                       f"({layout.EVAL_METRICS}) nor an index version (v1, v2, ... of `tunelab rag index`); "
                       "merge/export folders are registered by what writes them.")
