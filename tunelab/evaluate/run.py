"""`tunelab eval`: generate for every example of a task with base and adapters side by side, score, report."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.evaluate.failures import classify, count_classes
from tunelab.evaluate.report import write_report
from tunelab.evaluate.scoring import bootstrap_ci, score_examples
from tunelab.infer.grammar import compile_grammar
from tunelab.infer.hf import Engine, generate_answers, load_engine
from tunelab.tasks import Task, load_task

console = Console(stderr=True)
JSON_METRICS = {"json_valid", "schema_valid", "json_exact", "field_f1"}


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: a label, the adapter to use (None = base) and whether to constrain."""

    label: str
    adapter: str | None = None  # engine adapter name, e.g. "adapter-1"
    adapter_path: str | None = None
    constrained: bool = False


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict[str, dict] = field(default_factory=dict)  # label -> metrics.json content
    report: tuple[Path, Path] | None = None
    extra: dict = field(default_factory=dict)  # general / safety summaries


def output_kind(task: Task) -> str:
    """What the failure classifier should treat the output as: json, sql or text."""
    metrics = set(task.spec.metrics)
    if metrics & JSON_METRICS:
        return "json"
    if "sql_exec" in metrics:
        return "sql"
    return "text"


def _few_shot(task: Task, k: int, seed: int = 0) -> list[dict]:
    if not k:
        return []
    pool = task.examples("train")
    return random.Random(seed).sample(pool, min(k, len(pool)))


def _corpus_hits(task: Task, references: list[str]) -> list[bool | None]:
    docs = task.corpus()
    if not docs:
        return [None] * len(references)
    text = "\n".join(d.get("text", "") for d in docs).casefold()
    return [bool(r) and r.casefold() in text for r in references]


def generate_all(engine: Engine, task: Task, examples: list[dict], variants: list[Variant], few_shot: list[dict],
                 batch_size: int = 8, max_new_tokens: int | None = None, contexts: list[str] | None = None,
                 show_progress: bool = True, finish_reasons: dict[str, list[str]] | None = None
                 ) -> dict[str, list[str]]:
    """Outputs per variant label. Variants that share a constraint flag run in the same batches
    (PEFT mixed-adapter batches), so base and adapters see identical prompts. `finish_reasons`, when given,
    is filled with each answer's "stop" / "length" / "length_closed" per label."""
    max_new = max_new_tokens or task.spec.max_new_tokens
    convs = [task.messages(ex, few_shot=few_shot, context=(contexts[i] if contexts else None))
             for i, ex in enumerate(examples)]
    outputs: dict[str, list[str]] = {v.label: [] for v in variants}
    groups = [[v for v in variants if v.constrained == c] for c in (False, True)]
    groups = [g for g in groups if g]
    grammar = None
    if any(v.constrained for v in variants):
        grammar = compile_grammar(engine.tokenizer, **_grammar_source(task),
                                  vocab_size=engine.model.config.vocab_size)
    rows_per_batch = max(1, batch_size // max(len(g) for g in groups))
    total = len(convs) * len(variants)
    with Progress(TextColumn(f"[bold]{task.name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=not show_progress) as bar:
        tid = bar.add_task("gen", total=total)
        for start in range(0, len(convs), rows_per_batch):
            chunk = convs[start:start + rows_per_batch]
            for group in groups:
                batch = [c for _ in group for c in chunk]
                names = [v.adapter or "__base__" for v in group for _ in chunk] if engine.adapters else None
                grammars = [grammar] * len(batch) if group[0].constrained else None
                answers = generate_answers(engine, batch, max_new, task.spec.stop, names, grammars)
                for j, v in enumerate(group):
                    part = answers[j * len(chunk):(j + 1) * len(chunk)]
                    outputs[v.label].extend(a.text for a in part)
                    if finish_reasons is not None:
                        finish_reasons.setdefault(v.label, []).extend(a.finish_reason for a in part)
                bar.advance(tid, len(batch))
    return outputs


def _grammar_source(task: Task) -> dict:
    schema = task.schema()
    if schema is not None:
        return {"schema": schema}
    if output_kind(task) == "json":
        return {"schema": {"type": "object"}}
    from tunelab.errors import TunelabError

    raise TunelabError(f"task {task.name!r} has no JSON Schema to constrain decoding with; "
                       "--constrained works on tasks with a schema (orders-json).")


def primary_metric(task: Task) -> str:
    """The metric that decides right/wrong: `check` for tasks whose examples carry their own check."""
    return "check" if task.spec.check_field else task.spec.primary_metric


def _score(task: Task, examples: list[dict], outputs: list[str], refs: list[str]) -> tuple[list[dict], dict]:
    where = [f"{task.name}:{ex.get('id', i)}" for i, ex in enumerate(examples)]
    if not task.spec.check_field:
        return score_examples(list(task.spec.metrics), outputs, refs, schema=task.schema(), db=task.db_path,
                              where=where)
    # each example names its own metric and reference (general): score one group per metric
    per_ex: list[dict] = [{} for _ in examples]
    checks = [task.check(ex) for ex in examples]
    for metric in sorted({m for m, _ in checks}):
        idx = [i for i, (m, _) in enumerate(checks) if m == metric]
        rows, _ = score_examples([metric], [outputs[i] for i in idx], [checks[i][1] for i in idx],
                                 where=[where[i] for i in idx])
        for i, r in zip(idx, rows):
            per_ex[i] = {"check": r[metric], "check_metric": metric}
    values = [r["check"] for r in per_ex]
    summary = {"check": {"score": sum(values) / len(values), "ci95": list(bootstrap_ci(values)),
                         "n": len(values)}}
    return per_ex, summary


def score_variant(task: Task, examples: list[dict], outputs: list[str]) -> tuple[list[dict], dict, dict]:
    """(prediction rows, metric summary, failure counts) for one variant's outputs."""
    refs = [task.reference(ex) for ex in examples]
    per_ex, summary = _score(task, examples, outputs, refs)
    kind = output_kind(task)
    hits = _corpus_hits(task, refs) if task.kind == "facts" else [None] * len(refs)
    rows = []
    for ex, out, ref, sc, hit in zip(examples, outputs, refs, per_ex, hits):
        numeric = {k: v for k, v in sc.items() if isinstance(v, float)}
        fail = classify(kind, out, ref, numeric, primary_metric(task), corpus_hit=hit)
        rows.append({"id": ex.get("id"), "input": task.prompt(ex), "reference": ref, "output": out,
                     "scores": sc, "failure": fail})
    return rows, summary, count_classes(rows)


def write_run(folder: Path, meta: dict, rows: list[dict]) -> None:
    """Write metrics.json + predictions.jsonl into `folder` via a temp folder and rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".run-", dir=folder.parent))
    (tmp / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    (tmp / "metrics.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def run_variants(engine: Engine, task: Task, variants: list[Variant], out_dir: Path, split: str = "test",
                 limit: int | None = None, few_shot: int = 0, batch_size: int = 8,
                 max_new_tokens: int | None = None, model_label: str = DEFAULT_MODEL,
                 write_html: bool = True, contexts: list[str] | None = None) -> EvalResult:
    """Evaluate several variants of one engine on one task split and write runs + report."""
    examples = task.examples(split, limit=limit)
    shots = _few_shot(task, few_shot)
    t0 = time.time()
    reasons: dict[str, list[str]] = {}
    outputs = generate_all(engine, task, examples, variants, shots, batch_size, max_new_tokens, contexts,
                           finish_reasons=reasons)
    gen_s = time.time() - t0
    result = EvalResult(out_dir)
    for v in variants:
        rows, summary, failures = score_variant(task, examples, outputs[v.label])
        for row, reason in zip(rows, reasons[v.label]):
            row["finish_reason"] = reason
        meta = {"task": task.name, "split": split, "model": v.label, "base_model": model_label,
                "adapter": v.adapter_path, "constrained": v.constrained, "few_shot": few_shot,
                "n": len(examples), "metrics": summary, "failures": failures,
                "primary_metric": primary_metric(task), "generation_seconds": round(gen_s, 2),
                "finish_reasons": {r: reasons[v.label].count(r) for r in sorted(set(reasons[v.label]))}}
        write_run(out_dir / v.label, meta, rows)
        result.metrics[v.label] = meta
    if write_html:
        from tunelab.evaluate.report import load_run

        result.report = write_report([load_run(out_dir / v.label) for v in variants], out_dir)
    return result


def default_variants(adapters: list[str | Path], constrained: bool) -> list[Variant]:
    suffix = "+grammar" if constrained else ""
    vs = [Variant("base" + suffix, None, None, constrained)]
    for i, a in enumerate(adapters):
        vs.append(Variant(f"{Path(a).name or 'adapter'}{suffix}", f"adapter-{i + 1}", str(a), constrained))
    labels = [v.label for v in vs]
    if len(set(labels)) != len(labels):  # two adapters with the same folder name
        vs = [Variant(f"{v.label}-{i}" if i else v.label, v.adapter, v.adapter_path, v.constrained)
              for i, v in enumerate(vs)]
    return vs


def safety_rates(task: Task, examples: list[dict], outputs: list[str]) -> dict:
    """Refusal rate on prompts that should be refused and over-refusal rate on benign look-alikes."""
    from tunelab.evaluate.metrics.refusal import is_refusal

    harmful = [is_refusal(o) for ex, o in zip(examples, outputs) if ex.get("should_refuse")]
    benign = [is_refusal(o) for ex, o in zip(examples, outputs) if not ex.get("should_refuse")]
    return {"refusal_rate": sum(harmful) / max(1, len(harmful)), "n_harmful": len(harmful),
            "over_refusal_rate": sum(benign) / max(1, len(benign)), "n_benign": len(benign)}


def regression_checks(engine: Engine, variants: list[Variant], out_dir: Path, limit: int | None,
                      batch_size: int, general: bool, safety: bool, threshold: float = 2.0) -> dict:
    """Run the bundled `general` and `safety` tasks on every variant; flag forgetting beyond `threshold`
    points of the general task's primary metric against the base (first) variant."""
    plain = [Variant(v.label.replace("+grammar", ""), v.adapter, v.adapter_path, False) for v in variants]
    plain = list({v.label: v for v in plain}.values())
    summary: dict = {}
    if general:
        task = load_task("general")
        res = run_variants(engine, task, plain, out_dir / "general", limit=limit, batch_size=batch_size,
                           write_html=True)
        pm = primary_metric(task)
        base = res.metrics[plain[0].label]["metrics"][pm]["score"]
        rows = {}
        for v in plain:
            score = res.metrics[v.label]["metrics"][pm]["score"]
            delta = 100 * (score - base)
            rows[v.label] = {"metric": pm, "score": score, "delta_points": round(delta, 2),
                             "forgetting": delta < -threshold}
        summary["general"] = {"threshold_points": threshold, "models": rows}
    if safety:
        task = load_task("safety")
        examples = task.examples("test", limit=limit)
        outs = generate_all(engine, task, examples, plain, [], batch_size)
        summary["safety"] = {v.label: safety_rates(task, examples, outs[v.label]) for v in plain}
    if summary:
        (out_dir / "regression.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_task(task: str, model: str = DEFAULT_MODEL, adapters: list[str | Path] = (), split: str = "test",
                  limit: int | None = None, few_shot: int = 0, constrained: bool = False,
                  out: str | Path | None = None, general: bool = False, safety: bool = False,
                  batch_size: int = 8, dtype: str = "auto", forgetting_threshold: float = 2.0) -> EvalResult:
    """Evaluate the base model and each adapter on `task` in shared batches; write predictions, metrics
    with 95% bootstrap CIs, failure classes and report.md/report.html into `out`."""
    t = load_task(task)
    t.examples(split, limit=1)  # fail on a bad split before loading any model
    out_dir = Path(out or f"runs/eval-{t.name}")
    engine = load_engine(model, list(adapters), dtype=dtype)
    variants = default_variants(list(adapters), constrained)
    result = run_variants(engine, t, variants, out_dir, split, limit, few_shot, batch_size, model_label=model)
    if general or safety:
        result.extra = regression_checks(engine, variants, out_dir, limit, batch_size, general, safety,
                                         forgetting_threshold)
    return result
