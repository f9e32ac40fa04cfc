"""Merge interference: a LoRA for orders-json and one for shop-sql, merged by every method, scored on both tasks.

Two adapters of equal rank on the bundled model, one per task (trained here with the ladder's short recipe,
tunelab.ladder.climb.TRAIN_RECIPE, for `--max-steps` optimizer steps each, or given with `--adapters`), are
merged by each of PEFT's `add_weighted_adapter` methods through `tunelab merge`'s library function, with the
same weights (default 1,1: each adapter's delta at full strength) and, for the pruning methods, the same
density (default 0.5). The base, each single adapter and each merge then run on the first `--limit` test
examples of both tasks: one `tunelab eval` per task with every adapter in one engine, so all rows see the same
prompts, batched together. Each task is scored by its primary metric (orders-json field_f1, shop-sql
sql_exec) with a 95% bootstrap CI.

"retained" is a row's score over the specialist's (the adapter trained on that task) on the same examples;
a `*` marks a drop whose paired-bootstrap 95% CI (row minus specialist, per example) lies wholly below zero.
"gain kept" is (row - base) / (specialist - base): the share of what finetuning added that survives.

    python bench/merge_interference.py --threads 1 --out runs/bench/interference.json   # ~40 min, busy 2-core CPU
    python bench/merge_interference.py --adapters runs/orders runs/shop --limit 8 --methods linear,cat  # smoke
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from _common import BUNDLED, log, markdown, print_table, save_json

TASKS = ("orders-json", "shop-sql")


def train_adapters(model: str, work: Path, steps: int, seed: int) -> list[Path]:
    """One LoRA per task with the ladder's recipe (rank 16 on attention + MLP); a finished one is reused."""
    from tunelab.config.recipe import load_recipe
    from tunelab.ladder.climb import TRAIN_RECIPE
    from tunelab.train import train

    out = []
    for task in TASKS:
        folder = work / f"{task}-lora"
        if (folder / "adapter_config.json").is_file():
            log.print(f"reusing the adapter in {folder} (delete it to train again)")
        else:
            log.print(f"training a LoRA on {task} for {steps} steps -> {folder}")
            t0 = time.time()
            recipe = load_recipe(None, [f"model.spec={model}", f"data.task={task}", *TRAIN_RECIPE,
                                        f"train.max_steps={steps}", f"validation.every={steps}", f"train.seed={seed}",
                                        f"output_dir={folder}"])
            train(recipe, show_progress=False)
            log.print(f"  trained in {time.time() - t0:.0f}s")
        out.append(folder)
    return out


def merge_all(adapters: list[Path], work: Path, methods: list[str], weights: list[float], density: float,
              seed: int) -> dict[str, dict]:
    """Every method's merged adapter under work/merges/merge-METHOD; returns {method: merge.json info}."""
    import torch

    from tunelab.merge import merge_adapters
    from tunelab.merge.adapters import NEEDS_DENSITY

    merged = {}
    for method in methods:
        out = work / "merges" / f"merge-{method}"
        shutil.rmtree(out, ignore_errors=True)  # this bench's own folder, rewritten each run
        torch.manual_seed(seed)  # the dare methods drop entries at random (torch's global generator)
        t0 = time.time()
        res = merge_adapters(adapters, out, method=method, weights=weights,
                             density=density if method in NEEDS_DENSITY else None)
        log.print(f"merged by {method} (rank {res.info['rank']}) in {time.time() - t0:.1f}s -> {out}")
        merged[method] = {**res.info, "out": str(out)}
    return merged


def evaluate_all(model: str, folders: list[Path], work: Path, limit: int, max_new_tokens: int | None) -> dict:
    """One eval per task, base + every folder in one engine: {task: {label: (summary, per-example scores)}}."""
    from tunelab.evaluate.harness import evaluate_task, primary_metric
    from tunelab.tasks import load_task

    results = {}
    for name in TASKS:
        task = load_task(name)
        if max_new_tokens:  # a smoke run's shorter budget
            task.spec = task.spec.model_copy(update={"max_new_tokens": max_new_tokens})
        t0 = time.time()
        res = evaluate_task(task, model, adapters=folders, limit=limit, out=work / f"eval-{name}")
        log.print(f"evaluated {len(folders) + 1} models on {name} in {time.time() - t0:.0f}s")
        pm = primary_metric(task)
        results[name] = {label: {"metric": pm, **meta["metrics"][pm],
                                 "values": [r["scores"][pm] for r in res.predictions[label]]}
                         for label, meta in res.metrics.items()}
    return results


def compare(results: dict, specialists: dict[str, str]) -> dict:
    """Per task and label: score, CI, retained (over the specialist), paired change and gain kept."""
    from tunelab.evaluate.regression import paired_change

    table: dict = {}
    for task, by_label in results.items():
        spec, base = by_label[specialists[task]], by_label["base"]
        gain = spec["score"] - base["score"]
        for label, r in by_label.items():
            change = paired_change(spec["values"], r["values"], threshold=0.0)
            table.setdefault(label, {})[task] = {
                "metric": r["metric"], "score": r["score"], "ci95": r["ci95"], "n": r["n"],
                "retained": r["score"] / spec["score"] if spec["score"] else None,
                "gain_kept": (r["score"] - base["score"]) / gain if gain > 0 else None,
                "vs_specialist_points": change["delta_points"], "vs_specialist_ci95": change["ci95_points"],
                "significant_drop": change["worse"]}
    return table


def cells(c: dict) -> list[str]:
    """A task's three cells: score [CI], retained (with * on a significant drop), gain kept."""
    lo, hi = c["ci95"]
    ret = "-" if c["retained"] is None else f"{c['retained']:.2f}" + ("*" if c["significant_drop"] else "")
    kept = "-" if c["gain_kept"] is None else f"{c['gain_kept']:+.2f}"
    return [f"{c['score']:.3f} [{lo:.2f}, {hi:.2f}]", ret, kept]


def rows_of(table: dict, labels: dict[str, str]) -> list[list[str]]:
    return [[shown, *(x for task in TASKS for x in cells(table[label][task]))] for label, shown in labels.items()]


def main() -> int:
    from tunelab.merge import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", nargs=2, type=Path, metavar=("ORDERS_JSON", "SHOP_SQL"),
                   help="use these adapters (same base, same rank) instead of training them")
    p.add_argument("--max-steps", type=int, default=80, help="optimizer steps per adapter when training")
    p.add_argument("--limit", type=int, default=60, help="first N test examples of each task")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated merge methods")
    p.add_argument("--weights", default="1,1", help="one weight per adapter, orders-json first")
    p.add_argument("--density", type=float, default=0.5, help="kept fraction for ties / dare / magnitude_prune")
    p.add_argument("--model", default=BUNDLED)
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the tasks' budgets (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default torch's; on a CPU shared with other jobs 1 avoids stalls)")
    p.add_argument("--work", type=Path, default=Path("runs/bench/interference"),
                   help="adapters, merges and eval folders go here")
    p.add_argument("--out", default=None, help="results JSON (a markdown table is written beside it)")
    a = p.parse_args()
    weights = [float(w) for w in a.weights.split(",")]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    t0 = time.time()
    adapters = list(a.adapters) if a.adapters else train_adapters(a.model, a.work, a.max_steps, a.seed)
    merged = merge_all(adapters, a.work, methods, weights, a.density, a.seed)
    folders = [*adapters, *(Path(m["out"]) for m in merged.values())]
    results = evaluate_all(a.model, folders, a.work, a.limit, a.max_new_tokens)

    names = [f.name for f in adapters]  # the eval labels of the single adapters (their folder names)
    labels = {"base": "base", names[0]: f"{TASKS[0]} adapter", names[1]: f"{TASKS[1]} adapter",
              **{f"merge-{m}": f"merge: {m}" for m in methods}}
    table = compare(results, dict(zip(TASKS, names)))
    metrics = {task: results[task]["base"]["metric"] for task in TASKS}
    columns = ["model", *(x for task in TASKS for x in (f"{task} {metrics[task]} [95% CI]", "retained",
                                                        "gain kept"))]
    rows = rows_of(table, labels)
    n = {task: results[task]["base"]["n"] for task in TASKS}
    caption = (f"weights {','.join(map(str, weights))}, density {a.density} (ties/dare/magnitude_prune); "
               f"first {n[TASKS[0]]} / {n[TASKS[1]]} test examples; * = drop vs the specialist with a paired "
               f"95% CI below zero; {time.time() - t0:.0f}s in all")
    print_table("merge interference: orders-json + shop-sql adapters", columns, rows, caption=caption)
    if a.out:
        Path(a.out).with_suffix(".md").parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).with_suffix(".md").write_text(markdown(columns, rows) + f"\n\n{caption}\n")
    save_json(a.out, {"adapters": [str(f) for f in adapters], "weights": weights, "density": a.density,
                      "limit": a.limit, "merges": merged, "table": table, "labels": labels,
                      "seconds": time.time() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
