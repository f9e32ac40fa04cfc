"""Subcommands that size and decide: score, memory, plan, lint, ladder, advise."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tunelab.cli._app import LoadInOpt, _print_json, app, out, say
from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError


@app.command()
def score(
    metric: str,
    predictions: Annotated[Path, typer.Option(help="JSONL rows with `output` (and optional `id`)")],
    references: Annotated[Path, typer.Option(help="JSONL rows with `reference` (and optional `id`)")],
    schema: Annotated[Path | None, typer.Option(help="JSON Schema for schema_valid")] = None,
    db: Annotated[Path | None, typer.Option(help="SQLite database for sql_exec")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Score any model's outputs with one metric (95% bootstrap CI)."""
    from tunelab.evaluate.scoring import score_files

    res = score_files(metric, predictions, references, schema, db)
    if as_json:
        print(json.dumps(res))
    else:
        lo, hi = res["ci95"]
        out.print(f"{res['metric']}: {res['score']:.4f}  (95% CI {lo:.4f}-{hi:.4f}, n={res['n']})")


@app.command()
def memory(
    model: Annotated[str | None, typer.Argument(help="catalog HF id, bundled alias, config.json/folder or .gguf")]
    = None,
    method: Annotated[str, typer.Option(help="full|lora|dora|qlora|prompt")] = "lora",
    seq: Annotated[int, typer.Option(help="sequence length")] = 2048,
    batch: Annotated[int, typer.Option(help="per-device batch")] = 1,
    precision: Annotated[str, typer.Option(help="bf16|fp16|fp32")] = "bf16",
    optimizer: Annotated[str, typer.Option(help="adamw|adamw_8bit|paged_adamw|sgd (momentum)")] = "adamw",
    grad_ckpt: Annotated[bool, typer.Option("--grad-ckpt", help="gradient checkpointing")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 32,
    lora_targets: Annotated[str, typer.Option(help="attention | attention+mlp | q_proj,v_proj,...")] =
    "attention+mlp",
    gpus: Annotated[int, typer.Option(help="GPUs (ZeRO shards across them)")] = 1,
    zero: Annotated[int, typer.Option(help="ZeRO stage 0-3")] = 0,
    inference: Annotated[bool, typer.Option("--inference", help="serving memory (weights + KV cache)")] = False,
    context: Annotated[int | None, typer.Option(help="tokens of context for --inference")] = None,
    params: Annotated[str | None, typer.Option(help="quick math for a model known only by size, e.g. 13B")]
    = None,
    measure_recipe: Annotated[Path | None, typer.Option(
        "--measure", help="measure a recipe's step as `tunelab train` runs it here (device, fast paths)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Memory for training or serving: every component, checked against measurement (--measure)."""
    from tunelab import memory as mem
    from tunelab.cli.tables import comparison_table, estimate_table

    if measure_recipe is not None:
        from tunelab.config.recipe import load_recipe

        comparison = mem.check_recipe(load_recipe(measure_recipe))
        _print_json(comparison.to_json()) if as_json else out.print(comparison_table(comparison))
        return
    if params is not None:
        q = mem.quick_math(mem.parse_count(params), 4 if precision == "fp32" else 2, optimizer=optimizer)
        if as_json:
            _print_json(q.to_json())
        else:
            for line in q.lines():
                out.print(line)
        return
    if model is None:
        raise TunelabError("tunelab memory needs MODEL (e.g. meta-llama/Llama-3.1-8B), --params 13B, or "
                           "--measure RECIPE.")
    from tunelab.config.recipe import LoraConfig, TrainConfig

    targets = lora_targets if "," not in lora_targets else lora_targets.split(",")
    train = TrainConfig(max_length=seq, batch_size=batch, precision=precision, optimizer=optimizer,
                        grad_checkpointing=grad_ckpt)
    e = mem.estimate(model, method, train, LoraConfig(r=lora_r, targets=targets), gpus=gpus, zero=zero,
                     inference=inference, context=context)
    _print_json(e.to_json()) if as_json else out.print(estimate_table(e))


@app.command()
def plan(
    model: Annotated[str, typer.Option("--model", "-m", help="catalog HF id, alias, folder or .gguf")],
    gpu_memory: Annotated[str, typer.Option(help="memory per GPU, e.g. 24GB")],
    gpus: Annotated[int, typer.Option()] = 1,
    examples: Annotated[int, typer.Option(help="training examples you have")] = 5000,
    goal: Annotated[str, typer.Option(help="format|style|knowledge|distill")] = "format",
    seq: Annotated[int | None, typer.Option(help="max sequence length")] = None,
    write_recipe: Annotated[Path | None, typer.Option(help="write the recommendation as a recipe")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Should you finetune, and how: method, hyperparameters, batch, memory and time, with reasons."""
    from tunelab.cli.tables import plan_table
    from tunelab.plan import plan as make_plan

    p = make_plan(model, gpu_memory, gpus=gpus, examples=examples, goal=goal, seq=seq)
    _print_json(p.to_json()) if as_json else out.print(plan_table(p))
    if write_recipe is not None:
        from tunelab.config.recipe import save_recipe

        recipe = p.to_recipe()
        if recipe is None:
            raise TunelabError("the advice is not to finetune, so there is no recipe to write.")
        save_recipe(recipe, write_recipe)
        out.print(f"wrote {write_recipe}")


@app.command()
def lint(
    recipe: Path,
    budget: Annotated[str | None, typer.Option(help="memory budget, e.g. 24GB")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check a recipe against the guide's pitfalls; exits 1 when there are errors."""
    from tunelab.config.recipe import load_recipe
    from tunelab.memory import parse_bytes
    from tunelab.plan import lint as run_lint

    findings = run_lint(load_recipe(recipe), budget_bytes=parse_bytes(budget) if budget else None)
    if as_json:
        _print_json([f.to_json() for f in findings])
    else:
        for f in findings:
            color = {"error": "[red]", "warning": "[yellow]"}.get(f.level, "[dim]")
            out.print(color + escape(str(f)), highlight=False)
        if not findings:
            out.print("[green]no findings[/green]")
    if any(f.level == "error" for f in findings):
        raise typer.Exit(1)


@app.command()
def ladder(
    task: Annotated[str | None, typer.Argument(help="a bundled task or a task folder")] = None,
    data: Annotated[Path | None, typer.Option(help="your own JSONL instead of a task (as in tunelab eval)")] = None,
    metric: Annotated[list[str] | None, typer.Option(help="metric for --data (repeatable; first is primary)")]
    = None,
    schema: Annotated[Path | None, typer.Option(help="JSON Schema file for --data (constrained rungs)")] = None,
    db: Annotated[Path | None, typer.Option(help="SQLite file for --data with sql_exec")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="base model: bundled alias, HF folder or .gguf")]
    = DEFAULT_MODEL,
    rungs: Annotated[str | None, typer.Option(help="comma-separated subset, e.g. prompt,bm25,lora")] = None,
    target: Annotated[str | None, typer.Option(help='stop at the first rung meeting it, e.g. "schema_valid>=0.95"')]
    = None,
    limit: Annotated[int | None, typer.Option(help="held-out examples (default: the whole split)")] = None,
    split: Annotated[str, typer.Option()] = "test",
    few_shot: Annotated[int, typer.Option(help="examples from train in the few-shot rung")] = 3,
    k: Annotated[int, typer.Option("-k", help="passages retrieved per question in the RAG rungs")] = 3,
    adapter: Annotated[Path | None, typer.Option(help="use this LoRA adapter instead of training one")] = None,
    train_budget: Annotated[int, typer.Option(help="optimizer steps for the LoRA the ladder trains")] = 80,
    corpus: Annotated[Path | None, typer.Option(help="documents for the RAG rungs (default: the task's corpus)")]
    = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output folder (default runs/ladder-TASK)")]
    = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    load_in: LoadInOpt = None,
    rerank: Annotated[str | None, typer.Option(help="add the hybrid+rerank rung: 'judge' (the base model judges "
                                               "relevance) or a local cross-encoder folder")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Should you finetune? Run prompt -> few-shot -> constrained -> RAG -> LoRA on the same examples."""
    from tunelab.ladder import run_ladder
    from tunelab.ladder.report import ladder_json

    if (task is None) == (data is None):
        raise TunelabError("tunelab ladder needs TASK (see `tunelab tasks`) or --data FILE.jsonl with --metric.")
    if data is not None:
        from tunelab.evaluate.harness import data_task

        task = data_task(data, metric or [], schema, db)
    res = run_ladder(task, model, out_dir, rungs.split(",") if rungs else None, target, split, limit, few_shot, k,
                     adapter, train_budget, corpus, device=device, load_in=load_in, rerank=rerank)
    if as_json:
        _print_json(ladder_json(res))
        return
    t = Table("rung", res.primary, "95% CI", "failures", "s/example", title=f"ladder: {res.task}")
    for r in res.results:
        lo, hi = r.ci95
        t.add_row(r.label, f"{r.score:.3f}", f"{lo:.3f}-{hi:.3f}",
                  ", ".join(f"{c} {n}" for c, n in r.failures.items() if n) or "-", f"{r.latency_s:.2f}")
    out.print(t)
    say(res.recommendation.text())
    say(f"report: {res.report}")


@app.command()
def advise(
    eval_dir: Annotated[Path | None, typer.Argument(help="an eval folder (tunelab eval --out)")] = None,
    answers: Annotated[str | None, typer.Option(help="questionnaire answers without an eval, e.g. "
                                                     "metrics=yes,prompted=yes,facts=no,general=no,maintain=yes,form=yes")]
    = None,
) -> None:
    """What to try next: from an eval's failure classes, or (no data yet) from the quick decision guide."""
    from tunelab.ladder.decision_guide import QUESTIONS, advise_answers, advise_eval

    if eval_dir is not None:
        say(advise_eval(eval_dir).text())
        return
    given: dict[str, bool] = {}
    for part in filter(None, (answers or "").split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in QUESTIONS or value.strip().lower() not in ("yes", "no", "y", "n"):
            raise TunelabError(f"--answers {part!r}: write KEY=yes|no with KEY one of {', '.join(QUESTIONS)}.")
        given[key.strip()] = value.strip().lower().startswith("y")
    if sys.stdin.isatty():
        for key, (question, _, _) in QUESTIONS.items():
            if key not in given:
                given[key] = typer.confirm(question)
    say(advise_answers(given).text())

