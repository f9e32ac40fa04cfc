"""`tunelab upgrade --from BASE --to NEW`: retrain every adapter built on BASE from its recorded recipe on NEW, and
evaluate old and new side by side on its task, in one report with a recommendation per adapter.

The dependents come from the registry (`runs depends-on`): adapters whose run folder holds run.json and
recipe.yaml. Each is retrained with the same recipe and data, `model.spec` set to NEW, into OUT/NAME; the
old adapter on BASE and the new one on NEW answer the adapter's task's test split, and the paired change in
the primary metric (points, bootstrap 95% CI) says: switch (the CI lies above zero), keep (below zero) or
either (no difference the CI can see). An adapter already done in OUT is not retrained on a rerun.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.evaluate.regression import paired_change
from tunelab.runs import layout


def dependents(base: str, db: str | Path | None = None) -> list[Path]:
    """The adapter folders (training runs) the registry records as built on `base`, oldest first."""
    from tunelab.runs import depends_on

    found = depends_on(base, db=db)["artifacts"]
    paths = [Path(a["path"]) for a in found if a["kind"] == "adapter" and a.get("path")]
    return sorted({p for p in paths if layout.is_run_folder(p) and (p / layout.RECIPE_YAML).is_file()},
                  key=lambda p: str(p))


def recommend(change: dict) -> str:
    lo, hi = change["ci95_points"]
    return "switch" if lo > 0 else "keep" if hi < 0 else "either"


def _task_of(recipe: dict) -> str | None:
    return (recipe.get("data") or {}).get("task")


def retrain_recipe(folder: Path, new_base: str, out: Path, overrides: list[str] = ()) -> Path:
    """The adapter's recipe.yaml with model.spec = `new_base` and output_dir under `out`, written to out/NAME.yaml."""
    recipe = yaml.safe_load((folder / layout.RECIPE_YAML).read_text(encoding="utf-8")) or {}
    recipe.setdefault("model", {})["spec"] = str(new_base)
    recipe["output_dir"] = str(out / folder.name)
    path = out / f"{folder.name}.recipe.yaml"
    layout.atomic_write_text(path, yaml.safe_dump(recipe, sort_keys=False))
    return path


def upgrade(base: str, new_base: str, out: str | Path, *, overrides: list[str] = (), limit: int | None = None,
            trainer: Callable | None = None, evaluator: Callable | None = None,
            db: str | Path | None = None) -> dict:
    """Retrain and compare every adapter on `base`; write OUT/upgrade.json and upgrade.md; return the report.
    trainer(recipe_path, overrides) -> folder; evaluator(task, base, adapter, out_dir, limit) -> (metric, scores)."""
    from tunelab.ops.loop import train_version

    trainer = trainer or train_version
    evaluator = evaluator or evaluate_adapter
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = dependents(base, db)
    if not folders:
        raise TunelabError(f"nothing in the registry is built on {base!r} with a recorded recipe; see `tunelab runs "
                           f"depends-on {base}`.")
    rows = []
    for folder in folders:
        recipe = yaml.safe_load((folder / layout.RECIPE_YAML).read_text(encoding="utf-8")) or {}
        task = _task_of(recipe)
        done = out / f"{folder.name}.result.json"
        if done.is_file():
            rows.append(layout.read_json(done))
            continue
        if task is None:
            rows.append({"adapter": str(folder), "skipped": "its recipe names no task to evaluate on"})
            continue
        new = Path(trainer(retrain_recipe(folder, new_base, out, overrides), list(overrides)))
        metric, old_scores = evaluator(task, base, folder, out / "eval" / f"{folder.name}-old", limit)
        _, new_scores = evaluator(task, new_base, new, out / "eval" / f"{folder.name}-new", limit)
        change = paired_change(old_scores, new_scores, 0.0, "lower")
        row = {"adapter": str(folder), "retrained": str(new), "task": task, "metric": metric, "n": len(old_scores),
               "old": sum(old_scores) / max(1, len(old_scores)), "new": sum(new_scores) / max(1, len(new_scores)),
               "change": change, "recommendation": recommend(change)}
        layout.write_json(done, row)
        rows.append(row)
    report = {"from": base, "to": new_base, "adapters": rows}
    layout.write_json(out / "upgrade.json", report)
    layout.atomic_write_text(out / "upgrade.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# Base upgrade: {report['from']} -> {report['to']}", "",
             "| adapter | task | metric | n | old | new | change (points, 95% CI) | recommendation |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["adapters"]:
        if "skipped" in r:
            lines.append(f"| {Path(r['adapter']).name} | - | - | - | - | - | - | skipped: {r['skipped']} |")
            continue
        c = r["change"]
        lines.append(f"| {Path(r['adapter']).name} | {r['task']} | {r['metric']} | {r['n']} | {r['old']:.3f} | "
                     f"{r['new']:.3f} | {c['delta_points']:+.1f} [{c['ci95_points'][0]:+.1f}, "
                     f"{c['ci95_points'][1]:+.1f}] | {r['recommendation']} |")
    return "\n".join(lines) + "\n"


def evaluate_adapter(task: str, base: str, adapter: Path, out_dir: Path, limit: int | None) -> tuple[str, list]:
    """The primary metric per test example of `adapter` on `base` (tunelab.evaluate.harness)."""
    from tunelab.evaluate.harness import evaluate_task, primary_metric
    from tunelab.tasks.task import load_task

    t = load_task(task)
    res = evaluate_task(t, model=base, adapters=[adapter], out=out_dir, limit=limit, dtype="fp32")
    metric = primary_metric(t)
    label = [k for k in res.predictions if k != "base"][0]
    return metric, [float(r["scores"][metric]) for r in res.predictions[label]]
