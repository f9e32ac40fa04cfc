"""Subcommands for tasks, models, data, generation, training and evaluation."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Column, Table

from tunelab.cli._app import (
    DeviceOpt,
    KOpt,
    LoadInOpt,
    ModelOpt,
    RagOpt,
    TemplateOpt,
    _print_json,
    app,
    data_app,
    out,
    say,
)
from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError


@app.command()
def tasks(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the bundled tasks: kind, metrics, split sizes and split files."""
    from tunelab.tasks import tasks_table

    rows = tasks_table()
    if as_json:
        _print_json(rows)
        return
    t = Table(Column("task", no_wrap=True), "kind", "metrics", Column("splits", overflow="fold"))
    for r in rows:
        t.add_row(r["name"], r["kind"], ", ".join(r["metrics"]),
                  "\n".join(f"{k}: {v['size']}  {v['path']}" for k, v in r["splits"].items()))
    out.print(t)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What is bundled and cached, with each one's size and dtype."""
    from tunelab.models.inventory import list_models

    rows = list_models()
    if as_json:
        _print_json(rows)
        return
    t = Table(Column("model", no_wrap=True), "kind", "size", "dtype", "params", Column("path", overflow="fold"))
    for r in rows:
        t.add_row(r["name"], r["kind"], r["size"], r["dtype"] or "-", r["params"] or "-", r["path"])
    out.print(t)


@data_app.command("check")
def data_check(
    file: Path,
    model: ModelOpt = DEFAULT_MODEL,
    max_length: Annotated[int | None, typer.Option(help="flag rows longer than this")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Rows, format, token-length percentiles, duplicates, empty and over-long rows of a JSONL file."""
    from tunelab.cli.tables import check_table
    from tunelab.data import check_file
    from tunelab.models import load_tokenizer

    report = check_file(file, load_tokenizer(model), max_length)
    if as_json:
        _print_json(report.to_dict())
    else:
        out.print(check_table(report))


@data_app.command("distill")
def data_distill(
    teacher: Annotated[str, typer.Option(help="local model (alias, HF folder, .gguf, hub id) or openai:MODEL for "
                                              "an OpenAI-compatible endpoint (key from OPENAI_API_KEY)")],
    inputs: Annotated[Path, typer.Option(help="JSONL of prompts: `messages` (without the answer) or `prompt`")],
    out_file: Annotated[Path, typer.Option("--out", help="the JSONL to write (chat rows tunelab train reads)")],
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter folder for a local teacher")] = None,
    base_url: Annotated[str | None, typer.Option(help="endpoint URL (default $OPENAI_BASE_URL)")] = None,
    task: Annotated[str | None, typer.Option(help="filter with this task's checks (schema-valid JSON, SQL that "
                                                  "runs); its max_new_tokens and stop strings are the defaults")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="answer budget (default: the task's, else 512)")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    concurrency: Annotated[int, typer.Option(help="endpoint requests in flight at once")] = 8,
    retries: Annotated[int, typer.Option(help="more attempts per prompt on 429 / 5xx / connection errors")] = 5,
    min_length: Annotated[int, typer.Option(help="drop answers shorter than this (student tokens)")] = 1,
    max_length: Annotated[int | None, typer.Option(help="drop rows longer than this (student tokens, chat "
                                                        "template applied)")] = None,
    keep_truncated: Annotated[bool, typer.Option("--keep-truncated", help="keep answers cut off by --max-new-tokens")] = False,
    student: Annotated[str, typer.Option(help="the model to be trained: its tokenizer counts lengths")] = DEFAULT_MODEL,
    batch_size: Annotated[int, typer.Option(help="rows per engine call (local teacher)")] = 16,
    dtype: Annotated[str, typer.Option(help="checkpoint|auto|bf16|fp16|fp32 (local teacher)")] = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """A teacher answers every prompt; answers that pass the filters become training rows (resumable)."""
    from tunelab.distill import distill

    r = distill(teacher, inputs, out_file, adapter=adapter, base_url=base_url, task=task,
                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, concurrency=concurrency,
                retries=retries, min_length=min_length, max_length=max_length, keep_truncated=keep_truncated,
                student=student, batch_size=batch_size, dtype=dtype, device=device)
    why = ", ".join(f"{k} {v}" for k, v in r.dropped.items()) or "none"
    out.print(f"[green]kept[/green] {r.kept} of {r.prompts} prompts in {r.out} (asked {r.asked}, resumed "
              f"{r.resumed}, retries {r.retries}); dropped: {why} (see {r.rejected})", highlight=False)


@app.command()
def generate(
    prompt: str,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter folder")] = None,
    dtype: Annotated[str, typer.Option(help="checkpoint|auto|bf16|fp16|fp32")] = "auto",
    max_new_tokens: Annotated[int, typer.Option()] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    json_schema: Annotated[Path | None, typer.Option(help="constrain output to this JSON Schema")] = None,
    rag: RagOpt = None,
    k: KOpt = None,
    device: DeviceOpt = "auto",
    chat_template: TemplateOpt = None,
    load_in: LoadInOpt = None,
) -> None:
    """Chat with a model (chat template applied, greedy by default), streaming to the terminal."""
    from tunelab.infer import Request, SamplingParams, load_engine

    engine = load_engine(model, [adapter] if adapter else [], dtype=dtype, device=device,
                         chat_template=chat_template, load_in=load_in, max_batch=1)  # one request: llama.cpp on a CPU
    grammar = None
    if json_schema is not None:
        grammar = engine.compile_grammar(schema=json_schema)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if rag is not None:
        from tunelab.rag import augment_messages

        messages = augment_messages(rag, messages, prompt, k)
    request = Request(messages, adapter="adapter-1" if adapter else None,
                      params=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, grammar=grammar))
    for piece in engine.stream(request):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe (defaults when omitted)")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint")] = False,
    force: Annotated[bool, typer.Option("--force", help="train even if the memory estimate does not fit")] = False,
    chat_template: TemplateOpt = None,
) -> None:
    """Finetune with LoRA, QLoRA, prompt tuning or full finetuning from a recipe."""
    from tunelab.config.recipe import load_recipe
    from tunelab.train import train as run_train

    if recipe is not None and "=" in str(recipe) and not recipe.exists():
        overrides, recipe = [str(recipe), *(overrides or [])], None
    if chat_template is not None:  # the flag is recipe key model.chat_template
        overrides = [*(overrides or []), f"model.chat_template={chat_template}"]
    r = load_recipe(recipe, overrides or [])
    if r.data.rag:  # retrieval-aware: the passages go into the training rows first
        from tunelab.rag.raft import train_with_retrieval as run_train
    folder = run_train(r, resume=resume, force=force)
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch` every process returns here: say it once
        out.print(f"[green]saved[/green] {folder}")


eval_app = typer.Typer(help="Evaluate models on a task; `eval compare` reports on finished evals.")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
def eval_cmd(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Option(help="bundled task name or task folder")] = None,
    data: Annotated[Path | None, typer.Option(help="your own JSONL instead of a task: chat (the last assistant "
                                               "turn is the reference) or prompt/completion rows")] = None,
    metric: Annotated[list[str] | None, typer.Option(help="metric for --data (repeatable; the first is "
                                                      "primary)")] = None,
    schema: Annotated[Path | None, typer.Option(help="JSON Schema file, for --data with schema_valid")] = None,
    db: Annotated[Path | None, typer.Option(help="SQLite file, for --data with sql_exec / sql_valid")] = None,
    by_length: Annotated[str | None, typer.Option(help="also score per input length: bucket edges in tokens, "
                                                   "e.g. 256,1024")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[list[Path] | None, typer.Option(help="PEFT adapter folder (repeatable)")] = None,
    split: Annotated[str, typer.Option()] = "test",
    limit: Annotated[int | None, typer.Option(help="first N examples")] = None,
    few_shot: Annotated[int, typer.Option(help="K train examples as few-shot turns")] = 0,
    constrained: Annotated[bool, typer.Option(help="decode under the task's JSON Schema (xgrammar)")] = False,
    general: Annotated[bool, typer.Option(help="also run the general regression task")] = False,
    safety: Annotated[bool, typer.Option(help="also run the safety probes (refusal / over-refusal)")] = False,
    batch_size: Annotated[int, typer.Option(help="rows per batch of the generate-based engine")] = 8,
    dtype: Annotated[str, typer.Option(help="checkpoint|auto|bf16|fp16|fp32")] = "auto",
    out_dir: Annotated[Path | None, typer.Option("--out", help="output folder")] = None,
    rag: RagOpt = None,
    k: KOpt = None,
    device: DeviceOpt = "auto",
    chat_template: TemplateOpt = None,
    load_in: LoadInOpt = None,
) -> None:
    """Generate for every example, score with 95% CIs, classify failures, write report.md/html."""
    if ctx.invoked_subcommand is not None:
        return
    if (task is None) == (data is None):
        raise TunelabError("tunelab eval needs --task (see `tunelab tasks`) or --data FILE.jsonl with --metric, "
                           "not both; or use `tunelab eval compare`.")
    from tunelab.cli.eval_tables import render_result
    from tunelab.evaluate.buckets import parse_edges
    from tunelab.evaluate.harness import data_task, evaluate_task

    edges = parse_edges(by_length)
    if data is not None:
        task = data_task(data, metric or [], schema, db)
    elif metric or schema or db:
        raise TunelabError("--metric, --schema and --db go with --data; a task names its own metrics and files.")
    options = dict(model=model, adapters=adapter or [], few_shot=few_shot, constrained=constrained, out=out_dir,
                   general=general, safety=safety, batch_size=batch_size, dtype=dtype, device=device,
                   length_edges=edges, chat_template=chat_template, load_in=load_in)
    if rag is not None:
        from tunelab.rag import evaluate_with_rag

        result = evaluate_with_rag(task, rag, k, split, limit, **options)
    else:
        result = evaluate_task(task, split=split, limit=limit, **options)
    render_result(result, out)


@eval_app.command("compare")
def eval_compare(
    dirs: Annotated[list[Path], typer.Argument(help="eval output folders; the first is the baseline")],
    out: Annotated[Path, typer.Option(help="where to write report.md/html")] = Path("runs/compare"),
) -> None:
    """Compare finished evals: metric deltas with CIs, failure classes, flips, samples, loss curves."""
    from tunelab.evaluate.report import compare_dirs

    md, html = compare_dirs(dirs, out)
    say(f"wrote {md}\nwrote {html}")

