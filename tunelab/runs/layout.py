"""Every artifact folder's file names and their readers/writers, in one place (writes are atomic).

A training run folder holds the PEFT adapter (or full model), the tokenizer, `recipe.yaml` (the resolved
config), `train_log.jsonl` (one row per optimizer step / validation), `loss.png` and `run.json` (what made
it). An eval folder holds `metrics.json` (the metric summary) and `predictions.jsonl` (one row per example).
The training log was called `metrics.jsonl` before; it is still read from folders written then.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

# --- training run folder ----------------------------------------------------------------------------------
RUN_JSON = "run.json"
RECIPE_YAML = "recipe.yaml"
TRAIN_LOG = "train_log.jsonl"
LEGACY_TRAIN_LOG = "metrics.jsonl"  # the training log's name before train_log.jsonl; read, never written
LOSS_PNG = "loss.png"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"

# --- eval folder --------------------------------------------------------------------------------------------
EVAL_METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REGRESSION_JSON = "regression.json"

# --- folders later workflows write: each carries one JSON manifest naming what it was made from ------------
MERGE_JSON = "merge.json"
EXPORT_JSON = "export.json"
INDEX_JSON = "index.json"
LADDER_JSON = "ladder.json"
MANIFESTS = {"merge": MERGE_JSON, "export": EXPORT_JSON, "index": INDEX_JSON, "ladder": LADDER_JSON}

# Registry kinds: what a row of the registry is. "model" is a full finetune's output folder.
KINDS = ("dataset", "prompt", "recipe", "base_model", "run", "adapter", "model", "eval",
         "merge", "export", "index", "ladder", "rollout")


# --- atomic writes ------------------------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temp file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write `rows` one JSON object a line, atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file; a missing or malformed file raises a TunelabError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunelabError(f"{path} does not exist: expected the {what}.") from None
    except json.JSONDecodeError as e:
        raise TunelabError(f"{path} is not valid JSON ({e}); re-create the {what}.") from None


def _read_text(path: Path) -> str:
    """A text file's content (a UTF-8 byte-order mark tolerated); errors name the file, and the line of a byte
    that is not UTF-8."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise TunelabError(f"{path}: data file {what}; check the path (it is read relative to {Path.cwd()}).")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start:e.start + 1].hex()
        raise TunelabError(
            f"{path}:{line}: the file is not UTF-8 (byte 0x{bad} at byte offset {e.start}, column {col}). "
            "Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`."
        ) from None


def iter_jsonl(path: str | Path, skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, row)` for each non-blank line; line numbers count every physical line from 1.

    Raises TunelabError naming `file:line` for a missing or non-UTF-8 file, malformed JSON, or a line that
    holds something other than a JSON object. skip_bad: drop malformed and non-object lines instead (a log
    may end in a half-written line)."""
    path = Path(path)
    # split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON strings may contain raw
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if skip_bad:
                continue
            raise TunelabError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}). Each line must hold one "
                "complete JSON object; fix or delete the line (a record split over several lines is a common cause)."
            ) from None
        if not isinstance(row, dict):
            if skip_bad:
                continue
            raise TunelabError(
                f"{path}:{lineno}: expected a JSON object on each line, got a {type(row).__name__} "
                f"({line.strip()[:60]}). Wrap the record in an object such as {{\"messages\": [...]}}."
            )
        yield lineno, row


def read_jsonl(path: str | Path, skip_bad: bool = False) -> list[dict]:
    """All rows of a JSONL file as dicts (blank lines skipped); errors name `file:line`. skip_bad: drop
    malformed lines (a log may end in a half-written line)."""
    return [row for _, row in iter_jsonl(path, skip_bad)]


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row to a JSONL log (logs grow a line at a time; a torn last line is skipped on read)."""
    with open(path, "a+b") as f:
        torn = False
        if f.tell() > 0:  # a killed run may have left half a line: start on a fresh one
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(row, default=str) + "\n").encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (datasets, adapter weights): the key content-addressed rows use."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- training run folder -----------------------------------------------------------------------------------
def open_train_log(folder: str | Path) -> Path:
    """The training log a run appends to: `train_log.jsonl`; an old folder's `metrics.jsonl` is renamed."""
    folder = Path(folder)
    new, old = folder / TRAIN_LOG, folder / LEGACY_TRAIN_LOG
    if not new.exists() and old.is_file():
        try:
            old.replace(new)
        except FileNotFoundError:  # another process of a distributed run renamed it first
            pass
    return new


def find_train_log(folder: str | Path) -> Path | None:
    """The training log in a run folder (new name first, then the legacy one), or None."""
    for name in (TRAIN_LOG, LEGACY_TRAIN_LOG):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_train_log(folder: str | Path) -> list[dict]:
    """Rows {"step", "loss"?, "val_loss"?, ...} of a run folder's training log ([] when it has none)."""
    path = find_train_log(folder)
    return read_jsonl(path, skip_bad=True) if path else []


def write_run_json(folder: str | Path, info: dict) -> Path:
    """Write run.json (base model and hash, data hashes, versions, metrics, time, memory, recipe)."""
    return write_json(Path(folder) / RUN_JSON, info)


def read_run_json(folder: str | Path) -> dict:
    """run.json of a training run folder; a TunelabError when it is missing or malformed."""
    return read_json(Path(folder) / RUN_JSON, "run.json a finished `tunelab train` writes")


def is_run_folder(folder: str | Path) -> bool:
    return (Path(folder) / RUN_JSON).is_file()


def weights_file(folder: str | Path) -> Path | None:
    """The adapter (or full model) weights a run folder holds, or None."""
    for name in (ADAPTER_WEIGHTS, MODEL_WEIGHTS):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


# --- eval folder --------------------------------------------------------------------------------------------
def write_eval_folder(folder: str | Path, meta: dict, rows: list[dict]) -> Path:
    """Write metrics.json + predictions.jsonl into `folder` via a temp folder and a rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".eval-", dir=folder.parent))
    write_jsonl(tmp / PREDICTIONS, rows)
    write_json(tmp / EVAL_METRICS, meta)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def is_eval_folder(folder: str | Path) -> bool:
    return (Path(folder) / EVAL_METRICS).is_file()


def read_eval_metrics(folder: str | Path) -> dict:
    """metrics.json of an eval folder; a TunelabError naming the fix when it is missing or malformed."""
    folder = Path(folder)
    if not is_eval_folder(folder):
        raise TunelabError(f"{folder} has no {EVAL_METRICS}; pass folders written by `tunelab eval`.")
    return read_json(folder / EVAL_METRICS, "eval summary; re-run the eval")


def read_eval_folder(folder: str | Path) -> tuple[dict, list[dict]]:
    """(metrics.json content, predictions.jsonl rows) of an eval folder."""
    meta = read_eval_metrics(folder)
    preds = Path(folder) / PREDICTIONS
    return meta, (read_jsonl(preds) if preds.is_file() else [])


def find_eval_folders(folder: str | Path) -> list[Path]:
    """The eval folders in `folder`: itself when it holds metrics.json, else its subfolders that do."""
    folder = Path(folder)
    if is_eval_folder(folder):
        return [folder]
    subs = sorted(p for p in folder.iterdir() if is_eval_folder(p)) if folder.is_dir() else []
    if not subs:
        raise TunelabError(f"{folder} holds no eval results (no {EVAL_METRICS} in it or its subfolders).")
    return subs


# --- later kinds: merge, export, index and ladder folders -------------------------------------------------
def write_manifest(folder: str | Path, kind: str, info: dict) -> Path:
    """Write the manifest of a merge/export/index/ladder folder ({"made_from": [...], ...})."""
    if kind not in MANIFESTS:
        raise TunelabError(f"unknown artifact kind {kind!r}; one of {sorted(MANIFESTS)}.")
    return write_json(Path(folder) / MANIFESTS[kind], {"kind": kind, **info})


def folder_kind(folder: str | Path) -> str | None:
    """What an artifact folder is: run, eval, merge, export, index, ladder, or None."""
    if is_run_folder(folder):
        return "run"
    if is_eval_folder(folder):
        return "eval"
    return next((k for k, name in MANIFESTS.items() if (Path(folder) / name).is_file()), None)


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; it becomes `out` only if the block finishes, so a failure
    leaves nothing half-written. `out` must not exist or be empty."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunelabError(f"{out} exists and is not empty; remove it or give another output folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
