"""`tunelab loop`: reviewed traffic -> train -> evaluate -> gate -> NAME@v(n+1) -> 10% canary -> report, resumable.

Each step writes what it produced into the loop folder's loop.json before the next starts; a rerun skips the
steps recorded as done and starts again at the one that failed (or was killed). The data step takes the
reviewed rows (tunelab.ops.from_logs), holds out a share as "new traffic", and mixes the rest (repeated
`repeat` times) into the adapter's own training rows; training uses the adapter's recorded recipe on that
file. The gate passes when the golden test set shows no drop whose 95% CI excludes zero, the held-out new
traffic gains more than `min_gain` points, and the regression and safety probes flag nothing new against
the current version. Training and evaluation are plain callables (tests pass fakes).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.evaluate.regression import paired_change
from tunelab.ops import rollout
from tunelab.ops.from_logs import adapter_data, from_logs, register_dataset
from tunelab.ops.requestlog import RequestLog
from tunelab.runs import layout

STEPS = ("data", "train", "evaluate", "gate", "register", "canary", "report")
LOOP_JSON = "loop.json"


class GateFailed(TunelabError):
    """The new version did not pass the gate; `result` holds the reasons and the numbers."""

    def __init__(self, result: dict):
        self.result = result
        super().__init__("the gate stopped the loop: " + "; ".join(result["reasons"]))


@dataclass
class LoopConfig:
    """What one turn of the loop works on. `folder`: the current version's run folder (NAME@vN under the
    server's adapter root); `log`: the request log's URL; `train_overrides`: key=value recipe overrides."""

    folder: Path
    out: Path | None = None  # the loop folder (default: $TUNELAB_HOME/loops/NAME@v(n+1))
    log: str | Path | None = None
    since: float | None = None
    tenant: str | None = None
    test: Path | None = None  # the golden test set (default: the adapter's task's test split)
    drop_test_overlap: bool = False
    redact: tuple[tuple[str, str], ...] = ()  # the tenants' own redaction patterns (keys.yaml `redact`)
    heldout_share: float = 0.3  # reviewed rows kept out of training: the "new traffic" the gate measures
    repeat: int = 2  # each reviewed training row appears this many times in the mix
    train_overrides: list[str] = field(default_factory=list)
    limit: int | None = None  # golden test examples evaluated (None: all)
    probes: bool = True  # the regression (general) and safety probes
    probe_limit: int | None = 50
    min_gain: float = 0.0  # points the new traffic must gain
    canary: float = 10.0  # percent of the alias's traffic the new version gets
    seed: int = 0

    @property
    def alias(self) -> str:
        return self.folder.name.split("@")[0]

    @property
    def root(self) -> Path:
        return self.folder.parent


def current_folder(adapter: str, root: Path) -> Path:
    """The folder of the version a loop starts from: NAME@vN as given, else the alias's stable version in its
    rollout, else its highest version under `root`."""
    if "@" in adapter:
        return root / adapter
    r = rollout.get(adapter)
    if r is not None:
        return root / f"{adapter}@{r.stable}"
    n = int(next_version(root, adapter)[1:]) - 1
    if n < 1:
        raise TunelabError(f"no versions {adapter}@v1, {adapter}@v2 ... under {root}; give NAME@vN and --adapters.")
    return root / f"{adapter}@v{n}"


def next_version(root: Path, alias: str) -> str:
    """v(n+1) where n is the highest version of `alias` under `root`."""
    found = [int(p.name.split("@v")[1]) for p in root.glob(f"{alias}@v*") if p.name.split("@v")[1].isdigit()]
    return f"v{max(found, default=0) + 1}"


class Loop:
    """One turn of the loop; `run()` resumes from loop.json. trainer(recipe_path, overrides) -> run folder;
    evaluator(old_folder, new_folder, data_output, config, out_dir) -> scores (see `evaluate_versions`)."""

    def __init__(self, config: LoopConfig, trainer: Callable | None = None, evaluator: Callable | None = None):
        self.c = config
        self.trainer = trainer or train_version
        self.evaluator = evaluator or _evaluate_versions
        home = None
        if config.out is None:
            from tunelab.config.paths import tunelab_home

            home = tunelab_home() / "loops"
        self.state = self._load(home)
        self.out = Path(self.state["out"])

    def _load(self, home: Path | None) -> dict:
        if self.c.out is not None and (self.c.out / LOOP_JSON).is_file():
            return layout.read_json(self.c.out / LOOP_JSON, "loop.json `tunelab loop` writes")
        version = next_version(self.c.root, self.c.alias)
        out = self.c.out or home / f"{self.c.alias}@{version}"
        if (out / LOOP_JSON).is_file():  # a loop towards this version was started before: resume it
            return layout.read_json(out / LOOP_JSON, "loop.json `tunelab loop` writes")
        return {"alias": self.c.alias, "from": self.c.folder.name, "version": version, "out": str(out),
                "started": time.time(), "steps": {}}

    def _save(self) -> None:
        layout.write_json(self.out / LOOP_JSON, self.state)

    def done(self, step: str) -> dict | None:
        s = self.state["steps"].get(step)
        return s["output"] if s and s["status"] == "done" else None

    def run(self) -> dict:
        """Run the steps not done yet, in order; returns the report. Raises GateFailed (reasons, numbers) or
        the step's error, recorded in loop.json with the step's name."""
        self.out.mkdir(parents=True, exist_ok=True)
        for step in STEPS:
            if self.done(step) is not None:
                continue
            t0 = time.time()
            try:
                output = getattr(self, f"step_{step}")()
            except GateFailed as e:
                self.state["steps"][step] = {"status": "failed", "output": e.result, "error": str(e)}
                self._save()
                raise
            except BaseException as e:
                self.state["steps"][step] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                self._save()
                raise
            self.state["steps"][step] = {"status": "done", "output": output, "seconds": round(time.time() - t0, 2)}
            self._save()
        return self.done("report")

    # --- the steps -------------------------------------------------------------------------------------------
    def step_data(self) -> dict:
        c = self.c
        log = RequestLog.open(c.log)
        try:
            res = from_logs(c.alias, c.folder, self.out / "reviewed.jsonl", log=log, since=c.since, tenant=c.tenant,
                            test=c.test, drop_test_overlap=c.drop_test_overlap, redact_extra=c.redact)
        finally:
            log.close()
        # in content order before the seeded shuffle: the held-out share is then the same for the same reviews,
        # whatever order concurrent requests finished (and were logged and reviewed) in
        rows = sorted(res.rows, key=lambda r: json.dumps(r["messages"], sort_keys=True, ensure_ascii=False))
        random.Random(c.seed).shuffle(rows)
        n_held = min(len(rows) - 1, max(1, round(len(rows) * c.heldout_share))) if len(rows) > 1 else 0
        if n_held < 1:
            raise TunelabError(f"{len(rows)} reviewed row(s): the loop needs at least 2 (one to train on, one "
                               f"held out to measure the gain); review more: tunelab review {c.alias}.")
        held, new = rows[:n_held], rows[n_held:]
        data = adapter_data(c.folder, c.test)
        train = [{"messages": m} for m in data.train] + [{"messages": r["messages"]} for r in new] * c.repeat
        paths = {"reviewed": res.path, "heldout": self.out / "heldout.jsonl", "train": self.out / "train.jsonl",
                 "validation": self.out / "validation.jsonl"}
        layout.write_jsonl(paths["heldout"], held)
        layout.write_jsonl(paths["train"], train)
        layout.write_jsonl(paths["validation"], [{"messages": m} for m in data.validation] or train[:8])
        mixed = register_dataset(paths["train"], data, {"rows": len(train), "loop": self.state["version"]},
                                 extra={"reviewed": res.dataset_id})
        return {**{k: str(p) for k, p in paths.items()}, "counts": res.counts, "reviewed_rows": len(rows),
                "heldout_rows": len(held), "reviewed_train_rows": len(new), "original_train_rows": len(data.train),
                "repeat": c.repeat, "dataset_id": mixed, "reviewed_dataset_id": res.dataset_id,
                "task": data.task, "test": str(data.test_path) if data.test_path else None}

    def step_train(self) -> dict:
        d = self.done("data")
        recipe = layout.read_json(self.c.folder / layout.RUN_JSON).get("recipe") or {}
        recipe_file = self.c.folder / layout.RECIPE_YAML
        if recipe_file.is_file():
            recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        keep = {k: v for k, v in (recipe.get("data") or {}).items()
                if k not in ("task", "train", "validation", "mix", "rag")}  # limits, too_long, ...
        recipe["data"] = {**keep, "task": None, "train": d["train"], "validation": d["validation"]}
        recipe["output_dir"] = str(self.out / f"{self.c.alias}@{self.state['version']}")
        path = layout.atomic_write_text(self.out / layout.RECIPE_YAML, yaml.safe_dump(recipe, sort_keys=False))
        folder = Path(self.trainer(path, list(self.c.train_overrides)))
        if not (folder / layout.ADAPTER_CONFIG).is_file():
            raise TunelabError(f"training wrote no adapter into {folder}; see its train_log.jsonl.")
        return {"folder": str(folder), "recipe": str(path), "weights_sha256": layout.file_sha256(
            layout.weights_file(folder)) if layout.weights_file(folder) else None}

    def step_evaluate(self) -> dict:
        new = Path(self.done("train")["folder"])
        return self.evaluator(self.c.folder, new, self.done("data"), self.c, self.out / "eval")

    def step_gate(self) -> dict:
        result = gate(self.done("evaluate"), self.c.min_gain)
        if not result["passed"]:
            raise GateFailed(result)
        return result

    def step_register(self) -> dict:
        src = Path(self.done("train")["folder"])
        dest = self.c.root / f"{self.c.alias}@{self.state['version']}"
        if not dest.exists():
            tmp = self.c.root / f".{dest.name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoint-*"))
            tmp.rename(dest)  # atomic: the server's adapter scan never sees half a folder
        elif not (dest / layout.ADAPTER_CONFIG).is_file():
            raise TunelabError(f"{dest} exists and is not an adapter folder; move it aside and rerun the loop.")
        return {"folder": str(dest), "adapter_id": register_version(dest)}

    def step_canary(self) -> dict:
        cur = rollout.get(self.c.alias)
        stable = cur.stable if cur is not None else self.c.folder.name.split("@")[1]
        version = self.state["version"]
        r = rollout.set_weights(self.c.alias, {stable: 100.0 - self.c.canary, version: self.c.canary},
                                root=self.c.root, actor="loop")
        return {"weights": r.weights, "stable": r.stable, "rollout_event": r.event["id"]}

    def step_report(self) -> dict:
        report = {"alias": self.c.alias, "from": self.state["from"], "to": f"{self.c.alias}@{self.state['version']}",
                  **{s: self.done(s) for s in STEPS if s != "report"}}
        layout.write_json(self.out / "report.json", report)
        return report


def gate(scores: dict, min_gain: float = 0.0) -> dict:
    """Pass or fail with the numbers: scores = {golden: {metric, old, new}, traffic: {metric, old, new},
    probes: {general: bool, safety: bool} (True: the new version is flagged) or None}."""
    golden = paired_change(scores["golden"]["old"], scores["golden"]["new"], 0.0, "lower")
    traffic = paired_change(scores["traffic"]["old"], scores["traffic"]["new"], 0.0, "lower")
    reasons = []
    lo, hi = golden["ci95_points"]
    if golden["worse"]:
        reasons.append(f"golden set ({scores['golden']['metric']}): {golden['delta_points']:+.1f} points, 95% CI "
                       f"[{lo:+.1f}, {hi:+.1f}] excludes zero")
    if not traffic["delta_points"] > min_gain:
        tlo, thi = traffic["ci95_points"]
        reasons.append(f"new traffic ({scores['traffic']['metric']}): {traffic['delta_points']:+.1f} points "
                       f"[{tlo:+.1f}, {thi:+.1f}], not a gain over {min_gain:g}")
    for probe, flagged in (scores.get("probes") or {}).items():
        if flagged:
            reasons.append(f"{probe} probes: the new version is flagged against the current one")
    return {"passed": not reasons, "reasons": reasons or ["passed"], "golden": golden, "traffic": traffic,
            "probes": scores.get("probes"), "n": {k: len(scores[k]["old"]) for k in ("golden", "traffic")}}


def register_version(dest: Path) -> int | None:
    """Register the new version's folder: its run, recipe and training data, which was made from the reviewed
    rows and the version it follows (so `runs lineage` walks from v(n+1) back to vN and the reviews)."""
    from tunelab.runs import record_training_run

    return record_training_run(dest)


def train_version(recipe_path: Path, overrides: list[str]) -> Path:
    """Train per the loop's recipe, resuming from the latest checkpoint when a kill cut a run short."""
    from tunelab.train import train

    recipe, out, trained, resume = _training_plan(recipe_path, overrides)
    return out if trained else Path(train(recipe, resume=resume, show_progress=False))


def train_version_in_child(recipe_path: Path, overrides: list[str]) -> Path:
    """train_version as `tunelab train` in a child process, for a process that also serves (the loop demo):
    there the same steps ran ~35% slower than in a process of their own (4.7 vs 3.5 s a step of ~1,700
    tokens, measured), and a crash in training cannot take the server down. Its messages go to stderr."""
    import subprocess
    import sys

    _, out, trained, resume = _training_plan(recipe_path, overrides)
    if trained:
        return out
    cmd = [sys.executable, "-m", "tunelab", "train", str(recipe_path), *overrides, *(["--resume"] if resume else [])]
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    if code != 0 or not (out / layout.ADAPTER_CONFIG).is_file():
        raise TunelabError(f"`{' '.join(cmd[2:])}` failed (exit {code}): its messages are above; rerun the loop to "
                           f"resume from its latest checkpoint in {out}.")
    return out


def _training_plan(recipe_path: Path, overrides: list[str]):
    """(recipe, output folder, trained already (before a kill, recorded after it), resume from a checkpoint)."""
    from tunelab.config.recipe import load_recipe
    from tunelab.train.checkpoint import latest_checkpoint

    recipe = load_recipe(recipe_path, overrides)
    out = Path(recipe.output_dir)
    trained = (out / layout.RUN_JSON).is_file() and (out / layout.ADAPTER_CONFIG).is_file()
    return recipe, out, trained, latest_checkpoint(out) is not None


def _evaluate_versions(*args):
    return evaluate_versions(*args)


# --- the evaluation: both versions on one engine, per example ----------------------------------------------
def _scores(res, labels: list[str], metric: str) -> dict:
    old, new = labels
    return {"metric": metric, "old": [float(r["scores"][metric]) for r in res.predictions[old]],
            "new": [float(r["scores"][metric]) for r in res.predictions[new]],
            "eval": {lab: str(res.out_dir / lab) for lab in labels}}


def evaluate_versions(old: Path, new: Path, data: dict, config, out_dir: Path) -> dict:
    """{golden, traffic: {metric, old, new, eval}, probes: {general, safety}: True when the new version is
    flagged against the old} for the loop's gate. `data`: the loop's data step output."""
    from tunelab.evaluate.harness import (
        EvalJob,
        default_variants,
        primary_metric,
        regression_checks,
        run_together,
    )
    from tunelab.infer import load_engine
    from tunelab.runs.adapter_folder import read_adapter_folder
    from tunelab.tasks.from_data import DataTask
    from tunelab.tasks.task import load_task

    base = read_adapter_folder(old).base_model
    engine = load_engine(base, [old, new])  # bf16 where fast, as `tunelab eval` and the ladder evaluate
    variants = default_variants([old, new], False)[1:]  # the two versions; the old one is the reference
    labels = [v.label for v in variants]
    task = load_task(data["task"]) if data.get("task") and not config.test else None
    if task is None:
        test = config.test or data["test"]
        golden_task = DataTask.from_file(test, ["exact_match"])
    else:
        golden_task = task
    metric = primary_metric(golden_task)
    schema = task._asset(task.spec.schema_file, "schema") if task is not None else None
    traffic_task = DataTask.from_file(data["heldout"], [metric], schema=schema,
                                      max_new_tokens=golden_task.spec.max_new_tokens)  # the task's answer budget
    golden, traffic = run_together(engine, [  # one generation: the held-out rows fill the batch beside the golden
        EvalJob(golden_task, variants, out_dir / "golden", limit=config.limit, model_label=base, write_html=False),
        EvalJob(traffic_task, variants, out_dir / "traffic", model_label=base, write_html=False)])
    out = {"golden": _scores(golden, labels, metric), "traffic": _scores(traffic, labels, metric), "probes": None}
    if config.probes:
        s = regression_checks(engine, variants, out_dir / "probes", config.probe_limit, 8, True, True)
        new_label = labels[1]
        out["probes"] = {"general": bool(s["general"]["models"][new_label]["forgetting"]),
                         "safety": bool(s["safety"]["models"][new_label]["worse"])}
        out["probe_summary"] = s
    return out
