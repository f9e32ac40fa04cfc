"""`tunelab eval`: generate for every example of a task with base and adapters side by side, score, report."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError
from tunelab.evaluate import regression
from tunelab.evaluate.buckets import by_length
from tunelab.evaluate.failures import classify, count_classes
from tunelab.evaluate.report import write_report
from tunelab.evaluate.scoring import bootstrap_ci, group_scores, score_examples
from tunelab.infer import Engine, Request, SamplingParams, load_engine
from tunelab.models import identity, quantization_info
from tunelab.progress import progress
from tunelab.runs import register_eval
from tunelab.runs.layout import file_sha256, write_eval_folder
from tunelab.tasks import Task, load_task

JSON_METRICS = {"json_valid", "schema_valid", "json_exact", "field_f1"}
# (example, its chat messages) -> the messages to send, e.g. with retrieved passages (tunelab.rag). An
# `info` attribute, when it has one, is recorded in metrics.json under "augment".
Augment = Callable[[dict, list[dict]], list[dict]]


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
    predictions: dict[str, list[dict]] = field(default_factory=dict)  # label -> predictions.jsonl rows


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
                 batch_size: int = 8, max_new_tokens: int | None = None,
                 show_progress: bool = True, details: dict | None = None,
                 augment: Augment | None = None) -> dict[str, list[str]]:
    """Outputs per variant label. Every (example, variant) pair is one request to the engine, which batches
    them (base and adapters side by side, each row its own adapter and grammar), so all see identical prompts.
    `details`, when given, receives per label the Completion of each example (finish reasons, token counts).
    `augment` rewrites each example's messages before generation (retrieved passages: tunelab.rag)."""
    requests = _requests(engine, task, examples, variants, few_shot, max_new_tokens, augment)
    with progress(task.name, len(requests), show_progress, unit="answered") as update:
        done = engine.generate(requests, progress=update)
    return _by_variant(done, variants, len(examples), details)


def _requests(engine: Engine, task: Task, examples: list[dict], variants: list[Variant], few_shot: list[dict],
              max_new_tokens: int | None, augment: Augment | None) -> list[Request]:
    """Variant-major: every example for the first variant, then for the next."""
    max_new = max_new_tokens or task.spec.max_new_tokens
    convs = [task.messages(ex, few_shot=few_shot) for ex in examples]
    if augment is not None:
        convs = [augment(ex, c) for ex, c in zip(examples, convs)]
    grammar = None
    if any(v.constrained for v in variants):
        grammar = engine.compile_grammar(**_grammar_source(task))
    params = {c: SamplingParams(max_new_tokens=max_new, stop=task.spec.stop, grammar=grammar if c else None)
              for c in (False, True)}
    return [Request(c, adapter=v.adapter, params=params[v.constrained]) for v in variants for c in convs]


def _by_variant(done: list, variants: list[Variant], n: int, details: dict | None) -> dict[str, list[str]]:
    outputs: dict[str, list[str]] = {}
    for j, v in enumerate(variants):
        rows = done[j * n:(j + 1) * n]
        outputs[v.label] = [c.text.strip() for c in rows]
        if details is not None:
            details[v.label] = rows
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


def _score(task: Task, examples: list[dict], outputs: list[str], refs: list[str],
           details: list[dict]) -> tuple[list[dict], dict]:
    where = [f"{task.name}:{ex.get('id', i)}" for i, ex in enumerate(examples)]
    if not task.spec.check_field:
        return score_examples(list(task.spec.metrics), outputs, refs, schema=task.schema(), db=task.db_path,
                              where=where, details=details)
    details.extend({} for _ in examples)
    # each example names its own metric and reference (general): score one group per metric
    per_ex: list[dict] = [{} for _ in examples]
    checks = [task.check(ex) for ex in examples]
    for metric in sorted({m for m, _ in checks}):
        idx = [i for i, (m, _) in enumerate(checks) if m == metric]
        why: list[dict] = []
        rows, _ = score_examples([metric], [outputs[i] for i in idx], [checks[i][1] for i in idx],
                                 where=[where[i] for i in idx], details=why)
        for i, r, w in zip(idx, rows, why):
            per_ex[i] = {"check": r[metric], "check_metric": metric}
            details[i].update({"check": w[metric]} if metric in w else {})
    values = [r["check"] for r in per_ex]
    summary = {"check": {"score": sum(values) / len(values), "ci95": list(bootstrap_ci(values)),
                         "n": len(values)}}
    return per_ex, summary


def score_variant(task: Task, examples: list[dict], outputs: list[str]) -> tuple[list[dict], dict, dict]:
    """(prediction rows, metric summary, failure counts) for one variant's outputs."""
    refs = [task.reference(ex) for ex in examples]
    details: list[dict] = []
    per_ex, summary = _score(task, examples, outputs, refs, details)
    kind = output_kind(task)
    hits = _corpus_hits(task, refs) if task.kind == "facts" else [None] * len(refs)
    rows = []
    for ex, out, ref, sc, hit, why in zip(examples, outputs, refs, per_ex, hits, details):
        numeric = {k: v for k, v in sc.items() if isinstance(v, float)}
        fail = classify(kind, out, ref, numeric, primary_metric(task), corpus_hit=hit)
        rows.append({"id": ex.get("id"), "input": task.prompt(ex), "reference": ref, "output": out,
                     "scores": sc, "failure": fail, **({"explanations": why} if why else {})})
    return rows, summary, count_classes(rows)


def write_run(folder: Path, meta: dict, rows: list[dict]) -> None:
    """Write metrics.json + predictions.jsonl into `folder` (atomically, via tunelab.runs.layout)."""
    write_eval_folder(folder, meta, rows)


def provenance(task: Task, split: str, model: str, shots: list[dict]) -> dict:
    """What an eval was made from, for metrics.json and the registry: base model identity, data file hash,
    prompt hashes."""
    try:
        base = identity(model)
    except TunelabError:  # a label rather than a spec (tests, callers that built the engine themselves)
        base = {"spec": model}
    path = task.split_path(split)
    return {"base_model": base, "data": {"path": str(path), "sha256": file_sha256(path), "task": task.name},
            "few_shot_ids": [ex.get("id") for ex in shots], "prompts": prompt_versions(task, shots)}


def prompt_versions(task: Task, shots: list[dict]) -> dict:
    """The prompt versions an eval used: sha256[:12] of the system prompt, the prompt template and the few-shot
    set, as the registry keys them (tunelab.ops.prompts); None for a part the eval had none of."""
    import json

    from tunelab.runs.record import sha256_text

    parts = {"system": task.spec.system_prompt, "template": getattr(task.spec, "prompt_template", None),
             "few_shot": json.dumps(shots, sort_keys=True, ensure_ascii=False) if shots else None}
    return {k: sha256_text(v)[:12] if v else None for k, v in parts.items()}


@dataclass
class EvalJob:
    """One task split to evaluate (run_variants' arguments besides the engine), for run_together."""

    task: Task
    variants: list[Variant]
    out_dir: Path
    split: str = "test"
    limit: int | None = None
    few_shot: int = 0
    max_new_tokens: int | None = None
    model_label: str = DEFAULT_MODEL
    write_html: bool = True
    length_edges: list[int] | None = None
    augment: Augment | None = None


def run_variants(engine: Engine, task: Task, variants: list[Variant], out_dir: Path, split: str = "test",
                 limit: int | None = None, few_shot: int = 0, batch_size: int = 8,
                 max_new_tokens: int | None = None, model_label: str = DEFAULT_MODEL,
                 write_html: bool = True,
                 length_edges: list[int] | None = None, augment: Augment | None = None) -> EvalResult:
    """Evaluate several variants of one engine on one task split and write runs + report.

    length_edges: bucket edges in input tokens (e.g. [256, 1024]); metrics.json then also holds every
    metric per input-length bucket under "by_length", and the report shows them."""
    return run_together(engine, [EvalJob(task, variants, out_dir, split, limit, few_shot, max_new_tokens,
                                         model_label, write_html, length_edges, augment)])[0]


def run_together(engine: Engine, jobs: list[EvalJob]) -> list[EvalResult]:
    """run_variants on several task splits with one generation: the engine batches all their requests at once,
    so one set's rows fill the batch while another's long answers finish (two sets run one after the other
    leave it part empty at each one's tail). Each job's runs and report are written as run_variants writes
    them; their generation_seconds is the shared run's."""
    plans = []
    for j in jobs:
        examples = j.task.examples(j.split, limit=j.limit)
        shots = _few_shot(j.task, j.few_shot)
        plans.append((examples, shots, _requests(engine, j.task, examples, j.variants, shots, j.max_new_tokens,
                                                 j.augment)))
    requests = [r for _, _, reqs in plans for r in reqs]
    t0 = time.time()
    with progress(" + ".join(j.task.name for j in jobs), len(requests), True, unit="answered") as update:
        done = engine.generate(requests, progress=update)
    gen_s, start, results = time.time() - t0, 0, []
    for j, (examples, shots, reqs) in zip(jobs, plans):
        details: dict = {}
        outputs = _by_variant(done[start:start + len(reqs)], j.variants, len(examples), details)
        start += len(reqs)
        results.append(_write_job(engine, j, examples, shots, outputs, details, gen_s))
    return results


def _write_job(engine: Engine, j: EvalJob, examples: list[dict], shots: list[dict], outputs: dict, details: dict,
               gen_s: float) -> EvalResult:
    task = j.task
    prov = provenance(task, j.split, j.model_label, shots)
    model = getattr(engine, "model", None)
    quant = quantization_info(model) if model is not None else None  # None: unquantized weights
    result = EvalResult(j.out_dir)
    for v in j.variants:
        rows, summary, failures = score_variant(task, examples, outputs[v.label])
        reasons = [c.finish_reason for c in details[v.label]]
        for row, c in zip(rows, details[v.label]):  # length_closed: valid but cut short by the token budget
            row.update(finish_reason=c.finish_reason, new_tokens=len(c.token_ids), input_tokens=c.prompt_tokens)
        meta = {"task": task.name, "split": j.split, "model": v.label, "base_model": j.model_label,
                "adapter": v.adapter_path, "constrained": v.constrained, "few_shot": j.few_shot,
                "n": len(examples), "metrics": summary, "failures": failures,
                "finish_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
                "primary_metric": primary_metric(task), "generation_seconds": round(gen_s, 2),
                "provenance": prov, "quantization": quant}
        if j.length_edges:
            meta["by_length"] = {"edges": list(j.length_edges), "metrics": by_length(
                [r["scores"] for r in rows], [r["input_tokens"] for r in rows], j.length_edges)}
        groups = group_scores(examples, [r["scores"] for r in rows])  # e.g. handbook-qa's fact_in_train
        if groups:
            meta["groups"] = groups
        if j.augment is not None:
            meta["augment"] = getattr(j.augment, "info", repr(j.augment))
        write_run(j.out_dir / v.label, meta, rows)
        register_eval(j.out_dir / v.label, task.spec.system_prompt, shots)  # never raises
        result.metrics[v.label] = meta
        result.predictions[v.label] = rows
    if j.write_html:
        from tunelab.evaluate.report import load_run

        result.report = write_report([load_run(j.out_dir / v.label) for v in j.variants], j.out_dir)
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


def regression_checks(engine: Engine, variants: list[Variant], out_dir: Path, limit: int | None,
                      batch_size: int, general: bool, safety: bool, threshold: float = 2.0) -> dict:
    """Run the bundled `general` and `safety` tasks on every variant against the base (first) variant; flag
    forgetting, or a worse refusal / over-refusal rate, only when the paired-bootstrap CI of the change
    excludes zero and the change exceeds `threshold` points (see tunelab.evaluate.regression)."""
    plain = [Variant(v.label.replace("+grammar", ""), v.adapter, v.adapter_path, False) for v in variants]
    plain = list({v.label: v for v in plain}.values())
    summary: dict = {}
    if general:
        task = load_task("general")
        res = run_variants(engine, task, plain, out_dir / "general", limit=limit, batch_size=batch_size,
                           write_html=True)
        pm = primary_metric(task)
        scores = {v.label: [r["scores"][pm] for r in res.predictions[v.label]] for v in plain}
        summary["general"] = regression.general_summary(scores, pm, threshold)
    if safety:
        task = load_task("safety")
        examples = task.examples("test", limit=limit)
        outs = generate_all(engine, task, examples, plain, [], batch_size)
        summary["safety"] = regression.safety_summary([bool(ex.get("should_refuse")) for ex in examples],
                                                      outs, threshold)
    regression.write_summary(out_dir, summary)
    return summary


def evaluate_task(task: str | Task, model: str = DEFAULT_MODEL, adapters: list[str | Path] = (),
                  split: str = "test", limit: int | None = None, few_shot: int = 0, constrained: bool = False,
                  out: str | Path | None = None, general: bool = False, safety: bool = False,
                  batch_size: int = 8, dtype: str = "auto", forgetting_threshold: float = 2.0,
                  device: str = "auto", length_edges: list[int] | None = None,
                  chat_template: str | None = None, augment: Augment | None = None,
                  load_in: str | None = None) -> EvalResult:
    """Evaluate the base model and each adapter on `task` (a bundled name, a task folder or a loaded Task)
    in shared batches; write predictions, metrics with 95% bootstrap CIs, failure classes and
    report.md/report.html into `out`. length_edges: also split every metric by input tokens.
    chat_template: a .jinja file or `chatml` replacing the model's chat template. `augment` rewrites each
    example's messages (tunelab.rag.evaluate_with_rag passes the retrieved passages). load_in: 8bit | 4bit
    base weights (bitsandbytes); metrics.json records it under "quantization"."""
    t = task if isinstance(task, Task) else load_task(task)
    t.examples(split, limit=1)  # fail on a bad split before loading any model
    out_dir = Path(out or f"runs/eval-{t.name}")
    engine = load_engine(model, list(adapters), dtype=dtype, device=device, batch_size=batch_size,
                         chat_template=chat_template, load_in=load_in)
    variants = default_variants(list(adapters), constrained)
    result = run_variants(engine, t, variants, out_dir, split, limit, few_shot, batch_size, model_label=model,
                          length_edges=length_edges, augment=augment)
    if general or safety:
        result.extra = regression_checks(engine, variants, out_dir, limit, batch_size, general, safety,
                                         forgetting_threshold)
    return result


def data_task(data: str | Path, metrics: list[str], schema: str | Path | None = None,
              db: str | Path | None = None, max_new_tokens: int = 256) -> Task:
    """A task made from your own JSONL file (chat: the last assistant turn is the reference; or
    prompt/completion), scored with `metrics`; --schema / --db are checked here, before any model loads."""
    from tunelab.evaluate.metrics import check_inputs
    from tunelab.evaluate.scoring import check_db, load_schema
    from tunelab.tasks.from_data import DataTask

    if not metrics:
        raise TunelabError("tunelab eval --data needs at least one --metric (e.g. --metric exact_match).")
    if schema is not None:
        load_schema(schema)  # a readable Draft 2020-12 schema, or an error naming what to fix
    db = check_db(db) if db is not None else None
    for name in metrics:
        check_inputs(name, schema=schema, db=db)
    return DataTask.from_file(data, metrics, schema=schema, database=db, max_new_tokens=max_new_tokens)
