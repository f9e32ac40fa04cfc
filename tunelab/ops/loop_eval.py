"""The loop's evaluation: the current and the new version side by side on one engine, per example, for the gate.

The golden test set (the adapter's task's test split, or a given file), the held-out reviewed traffic (scored
with the task's primary metric), and the regression (general) and safety probes with the current version as
the reference, so a flag means the new version forgot or refuses differently than the one it replaces.
"""

from __future__ import annotations

from pathlib import Path


def _scores(res, labels: list[str], metric: str) -> dict:
    old, new = labels
    return {"metric": metric, "old": [float(r["scores"][metric]) for r in res.predictions[old]],
            "new": [float(r["scores"][metric]) for r in res.predictions[new]],
            "eval": {lab: str(res.out_dir / lab) for lab in labels}}


def evaluate_versions(old: Path, new: Path, data: dict, config, out_dir: Path) -> dict:
    """{golden, traffic: {metric, old, new, eval}, probes: {general, safety}: True when the new version is
    flagged against the old} for the loop's gate. `data`: the loop's data step output."""
    from tunelab.evaluate.harness import (
        default_variants,
        primary_metric,
        regression_checks,
        run_variants,
    )
    from tunelab.infer import load_engine
    from tunelab.runs.adapter_folder import read_adapter_folder
    from tunelab.tasks.from_data import DataTask
    from tunelab.tasks.task import load_task

    base = read_adapter_folder(old).base_model
    engine = load_engine(base, [old, new], dtype="fp32")
    variants = default_variants([old, new], False)[1:]  # the two versions; the old one is the reference
    labels = [v.label for v in variants]
    task = load_task(data["task"]) if data.get("task") and not config.test else None
    if task is None:
        test = config.test or data["test"]
        golden_task = DataTask.from_file(test, ["exact_match"])
    else:
        golden_task = task
    metric = primary_metric(golden_task)
    golden = run_variants(engine, golden_task, variants, out_dir / "golden", limit=config.limit, model_label=base,
                          write_html=False)
    schema = task._asset(task.spec.schema_file, "schema") if task is not None else None
    traffic_task = DataTask.from_file(data["heldout"], [metric], schema=schema)
    traffic = run_variants(engine, traffic_task, variants, out_dir / "traffic", model_label=base, write_html=False)
    out = {"golden": _scores(golden, labels, metric), "traffic": _scores(traffic, labels, metric), "probes": None}
    if config.probes:
        s = regression_checks(engine, variants, out_dir / "probes", config.probe_limit, 8, True, True)
        new_label = labels[1]
        out["probes"] = {"general": bool(s["general"]["models"][new_label]["forgetting"]),
                         "safety": bool(s["safety"]["models"][new_label]["worse"])}
        out["probe_summary"] = s
    return out
