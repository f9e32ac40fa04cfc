"""The `tunelab` command line: a dispatch table where each subcommand calls one library function."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.errors import TunelabError
from tunelab.evaluate.summary import fitted_console

app = typer.Typer(help="tunelab: decide whether to finetune, with numbers; then train, evaluate, ship.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Inspect training data files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
out = fitted_console()  # 80 columns when stdout is not a terminal
STATE = {"debug": False}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="bundled alias, HF folder, .gguf file or hub id")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")]
TemplateOpt = Annotated[str | None, typer.Option(
    "--chat-template", help="a .jinja file replacing the model's chat template, or chatml (for base models)")]
RagOpt = Annotated[Path | None, typer.Option("--rag", help="retrieval index: put its top passages in the prompt")]
KOpt = Annotated[int | None, typer.Option("-k", help="passages to retrieve (default: the index's k)")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    STATE["debug"] = debug


def _print_json(obj) -> None:
    out.print_json(json.dumps(obj, default=str))


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
    from tunelab.data import check_file, render_check
    from tunelab.models import load_tokenizer

    report = check_file(file, load_tokenizer(model), max_length)
    if as_json:
        _print_json(report.to_dict())
    else:
        render_check(report, out)


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
) -> None:
    """Chat with a model (chat template applied, greedy by default), streaming to the terminal."""
    from tunelab.infer import Request, compile_grammar, load_engine

    engine = load_engine(model, [adapter] if adapter else [], dtype=dtype, device=device,
                         chat_template=chat_template)
    grammar = None
    if json_schema is not None:
        grammar = compile_grammar(engine.tokenizer, schema=json_schema, vocab_size=engine.model.config.vocab_size)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if rag is not None:
        from tunelab.rag import augment_messages

        messages = augment_messages(rag, messages, prompt, k)
    request = Request(messages, adapter="adapter-1" if adapter else None, grammar=grammar,
                      max_new_tokens=max_new_tokens, temperature=temperature)
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
    folder = run_train(r, resume=resume, force=force)
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
) -> None:
    """Generate for every example, score with 95% CIs, classify failures, write report.md/html."""
    if ctx.invoked_subcommand is not None:
        return
    if (task is None) == (data is None):
        raise TunelabError("tunelab eval needs --task (see `tunelab tasks`) or --data FILE.jsonl with --metric, "
                           "not both; or use `tunelab eval compare`.")
    from tunelab.evaluate.buckets import parse_edges
    from tunelab.evaluate.run import data_task, evaluate_task
    from tunelab.evaluate.summary import render_result

    edges = parse_edges(by_length)
    if data is not None:
        task = data_task(data, metric or [], schema, db)
    elif metric or schema or db:
        raise TunelabError("--metric, --schema and --db go with --data; a task names its own metrics and files.")
    options = dict(model=model, adapters=adapter or [], few_shot=few_shot, constrained=constrained, out=out_dir,
                   general=general, safety=safety, batch_size=batch_size, dtype=dtype, device=device,
                   length_edges=edges, chat_template=chat_template)
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
    Console().print(f"wrote {md}\nwrote {html}")


runs_app = typer.Typer(help="The run registry: what was trained and evaluated, and what it was made from.",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


@runs_app.command("list")
def runs_list(
    kind: Annotated[str | None, typer.Option(help="only this kind: run, adapter, eval, base_model, dataset, ...")]
    = None,
    limit: Annotated[int | None, typer.Option(help="newest N")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Registered artifacts, newest first."""
    from tunelab.runs import list_artifacts

    rows = list_artifacts(kind, limit)
    if as_json:
        return _print_json(rows)
    t = Table("id", "kind", Column("name", no_wrap=True), "hash", "score", "created", Column("path", overflow="fold"))
    for r in rows:
        score = f"{r['primary_metric']} {r['primary_score']:.3f}" if r.get("primary_score") is not None else ""
        t.add_row(str(r["id"]), r["kind"], escape(str(r["name"] or "")), (r["hash"] or "")[:12], score,
                  r["created_at"], escape(str(r["path"] or "")))
    out.print(t)


@runs_app.command("show")
def runs_show(ref: Annotated[str, typer.Argument(help="id, folder or hash")], as_json: JsonOpt = False) -> None:
    """One artifact: its record, what it was made from and what was made from it."""
    from tunelab.runs import show

    d = show(ref)
    if as_json:
        return _print_json(d)
    out.print(f"[bold]#{d['id']} {d['kind']}[/bold] {escape(str(d['name']))}  {escape(str(d['path'] or ''))}")
    out.print_json(json.dumps(d["meta"], default=str))
    for title, items in (("made from", d["made_from"]), ("used by", d["used_by"])):
        t = Table("role", "id", "kind", Column("name", no_wrap=True), Column("path", overflow="fold"), title=title)
        for r in items:
            t.add_row(r["role"], str(r["id"]), r["kind"], escape(str(r["name"] or "")), escape(str(r["path"] or "")))
        out.print(t)


@runs_app.command("compare")
def runs_compare(refs: Annotated[list[str], typer.Argument(help="evals: ids or folders")],
                 as_json: JsonOpt = False) -> None:
    """Evals side by side: every metric and failure class."""
    from tunelab.runs import compare

    c = compare(refs)
    if as_json:
        return _print_json(c)
    t = Table("metric", *[f"#{e['id']} {escape(str(e['name']))}" for e in c["evals"]])
    for m, scores in {**c["metrics"], **{f"failures: {k}": v for k, v in c["failures"].items()}}.items():
        t.add_row(m, *["-" if s is None else f"{s:.4f}" if isinstance(s, float) else str(s) for s in scores])
    out.print(t)


@runs_app.command("lineage")
def runs_lineage(ref: Annotated[str, typer.Argument(help="adapter (or eval, merge, ...): id or folder")],
                 as_json: JsonOpt = False) -> None:
    """Walk back from an artifact to the base model, datasets, recipe and prompts that made it."""
    from rich.tree import Tree

    from tunelab.runs import lineage

    tree = lineage(ref)
    if as_json:
        return _print_json(tree)

    def label(n: dict) -> str:
        role = f"[dim]{n['role']}:[/dim] " if n["role"] else ""
        h = f" [dim]{n['hash'][:12]}[/dim]" if n["hash"] else ""
        return f"{role}[bold]{n['kind']}[/bold] #{n['id']} {escape(str(n['name'] or n['path'] or ''))}{h}"

    def grow(node: Tree, n: dict) -> None:
        for p in n["parents"]:
            grow(node.add(label(p)), p)

    root = Tree(label(tree))
    grow(root, tree)
    out.print(root)


@runs_app.command("depends-on")
def runs_depends_on(base: Annotated[str, typer.Argument(help="base model: spec, folder, hash or hub id")],
                    all_kinds: Annotated[bool, typer.Option("--all", help="also list runs and evals")] = False,
                    as_json: JsonOpt = False) -> None:
    """Every adapter, merge and export built on a base model (transitively): what to redo when it changes."""
    from tunelab.runs import depends_on

    d = depends_on(base, all_kinds)
    if as_json:
        return _print_json(d)
    t = Table("id", "kind", Column("name", no_wrap=True), "steps away", Column("path", overflow="fold"),
              title=f"built on {escape(base)}")
    for r in d["artifacts"]:
        t.add_row(str(r["id"]), r["kind"], escape(str(r["name"] or "")), str(r["depth"]), escape(str(r["path"] or "")))
    out.print(t)


@runs_app.command("register")
def runs_register(folder: Path) -> None:
    """Register a training run or eval folder written before the registry existed (or while it was away)."""
    from tunelab.runs import register_any

    out.print(f"registered #{register_any(folder)} {folder}")


rag_app = typer.Typer(help="Retrieval: index a corpus, query it, measure recall against gold passages.",
                      no_args_is_help=True)
app.add_typer(rag_app, name="rag")


@rag_app.command("index")
def rag_index(
    corpus: Annotated[str, typer.Argument(help="JSONL (id, text, title?), folder of .md/.txt, or a task name")],
    out_dir: Annotated[Path, typer.Option("--out", help="index folder (versions are kept side by side)")],
    kind: Annotated[str | None, typer.Option(help="bm25 | dense | hybrid (default hybrid)")] = None,
    chunk_tokens: Annotated[int | None, typer.Option(help="chunk size in the embedder's tokens")] = None,
    overlap: Annotated[int | None, typer.Option(help="tokens shared by neighbouring chunks")] = None,
    embedder: Annotated[str | None, typer.Option(help="sentence-transformers folder (default: MiniLM)")] = None,
    store: Annotated[str | None, typer.Option(help="postgresql://... (pgvector); default: files in --out")]
    = None,
    stemmer: Annotated[str | None, typer.Option(help="BM25 stemmer language, e.g. english (PyStemmer)")] = None,
    reranker: Annotated[Path | None, typer.Option(help="local cross-encoder folder to rerank with")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Chunk a corpus and index it (a new version when the corpus, chunking or embedder changed)."""
    from tunelab.rag import build_index

    idx = build_index(corpus, out_dir, kind, chunk_tokens, overlap, embedder, store, stemmer, reranker)
    m = idx.manifest
    if as_json:
        return _print_json(m)
    out.print(f"[green]indexed[/green] {m['corpus']['docs']} documents as {m['chunks']} chunks "
              f"({m['retrieval']['kind']}, {m['store']['kind']}) into {idx.folder}  key {m['key'][:12]}")


@rag_app.command("query")
def rag_query(
    index: Annotated[Path, typer.Argument(help="index folder (or one version folder)")],
    question: str,
    k: Annotated[int, typer.Option("-k", help="passages to return")] = 5,
    embedder: Annotated[str | None, typer.Option(help="refused unless it is the index's embedder")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The top-k passages for a question."""
    from tunelab.rag import query_index

    hits = query_index(index, question, k, embedder)
    if as_json:
        return _print_json([h.__dict__ for h in hits])
    t = Table("#", "score", "chunk", "title", "text")
    for i, h in enumerate(hits, 1):
        t.add_row(str(i), f"{h.score:.4f}", escape(h.id), escape(h.title), escape(h.text))
    out.print(t)


@rag_app.command("eval")
def rag_eval(
    index: Annotated[Path, typer.Argument(help="index folder (or one version folder)")],
    task: Annotated[str, typer.Option(help="task whose examples carry doc_id (e.g. handbook-qa)")],
    k: Annotated[int, typer.Option("-k")] = 5,
    split: Annotated[str, typer.Option()] = "test",
    limit: Annotated[int | None, typer.Option(help="first N examples")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recall@k and MRR of an index against a task's gold passages."""
    from tunelab.rag import evaluate_retrieval

    r = evaluate_retrieval(index, task, k, split, limit)
    if as_json:
        return _print_json(r)
    out.print(f"{r['task']}/{r['split']} ({r['kind']}, n={r['n']}): recall@{k} {r['recall_at_k']:.4f}  "
              f"MRR@{k} {r['mrr']:.4f}  misses: {len(r['misses'])}")


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
    optimizer: Annotated[str, typer.Option(help="adamw|adamw_8bit|paged_adamw|sgd|momentum")] = "adamw",
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

    if measure_recipe is not None:
        from tunelab.config.recipe import load_recipe

        comparison = mem.check_recipe(load_recipe(measure_recipe))
        _print_json(comparison.to_json()) if as_json else out.print(comparison.table())
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
    targets = lora_targets if "," not in lora_targets else lora_targets.split(",")
    e = mem.estimate(model, method=method, seq=seq, batch=batch, precision=precision, optimizer=optimizer,
                     grad_ckpt=grad_ckpt, lora_r=lora_r, lora_targets=targets, gpus=gpus, zero=zero,
                     inference=inference, context=context)
    _print_json(e.to_json()) if as_json else out.print(e.table())


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
    from tunelab.plan import plan as make_plan

    p = make_plan(model, gpu_memory, gpus=gpus, examples=examples, goal=goal, seq=seq)
    _print_json(p.to_json()) if as_json else out.print(p.table())
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
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Should you finetune? Run prompt -> few-shot -> constrained -> RAG -> LoRA on the same examples."""
    from tunelab.ladder import run_ladder
    from tunelab.ladder.report import ladder_json

    if (task is None) == (data is None):
        raise TunelabError("tunelab ladder needs TASK (see `tunelab tasks`) or --data FILE.jsonl with --metric.")
    if data is not None:
        from tunelab.evaluate.run import data_task

        task = data_task(data, metric or [], schema, db)
    res = run_ladder(task, model, out_dir, rungs.split(",") if rungs else None, target, split, limit, few_shot, k,
                     adapter, train_budget, corpus, device=device)
    if as_json:
        _print_json(ladder_json(res))
        return
    t = Table("rung", res.primary, "95% CI", "failures", "s/example", title=f"ladder: {res.task}")
    for r in res.results:
        lo, hi = r.ci95
        t.add_row(r.label, f"{r.score:.3f}", f"{lo:.3f}-{hi:.3f}",
                  ", ".join(f"{c} {n}" for c, n in r.failures.items() if n) or "-", f"{r.latency_s:.2f}")
    out.print(t)
    out.print(escape(res.recommendation.text()))
    out.print(f"report: {res.report}")


@app.command()
def advise(
    eval_dir: Annotated[Path | None, typer.Argument(help="an eval folder (tunelab eval --out)")] = None,
    answers: Annotated[str | None, typer.Option(help="questionnaire answers without an eval, e.g. "
                                                     "metrics=yes,prompted=yes,facts=no,general=no,maintain=yes,form=yes")]
    = None,
) -> None:
    """What to try next: from an eval's failure classes, or (no data yet) from the quick decision guide."""
    from tunelab.ladder.advise import QUESTIONS, advise_answers, advise_eval

    if eval_dir is not None:
        out.print(escape(advise_eval(eval_dir).text()))
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
    out.print(escape(advise_answers(given).text()))


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    adapters: Annotated[Path | None, typer.Option(help="folder whose subfolders are the servable adapters")] = None,
    keys: Annotated[Path | None, typer.Option(help="keys.yaml: tenants, hashed API keys, their adapters")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_adapters: Annotated[int, typer.Option(help="adapters resident at once (LRU)")] = 8,
    pin: Annotated[list[str] | None, typer.Option(help="adapter kept resident (repeatable)")] = None,
    merged: Annotated[Path | None, typer.Option(help="serve this adapter merged into the base (one tenant)")]
    = None,
    max_waiting: Annotated[int, typer.Option(help="requests in flight before 429")] = 256,
    rag_index: Annotated[list[str] | None, typer.Option(help="NAME=DIR: an index requests may name in "
                                                             "`rag_index` (repeatable)")] = None,
    device: DeviceOpt = "auto",
    hash_key: Annotated[str | None, typer.Option(help="print the keys.yaml hash of an API key and exit")] = None,
) -> None:
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, adapters per tenant."""
    if hash_key is not None:
        from tunelab.server.tenants import hash_key as digest

        print(digest(hash_key))
        return
    from tunelab.server import serve as run_server

    indexes = {}
    for item in rag_index or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise TunelabError(f"--rag-index {item!r}: write NAME=DIR, e.g. handbook=runs/idx-handbook.")
        indexes[name] = folder
    run_server(model, adapters, keys, host, port, max_adapters, pin or [], device=device, max_waiting=max_waiting,
               merged=merged, indexes=indexes)


@app.command()
def demo(
    limit: Annotated[int, typer.Option(help="test examples to evaluate")] = 32,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default: the demo recipe's)")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
) -> None:
    """The main job on the bundled model: prompted vs constrained vs LoRA on orders-json, with a report."""
    from tunelab.demo import run_demo

    run_demo(limit=limit, out=out, steps=steps)


@app.command("merge")
def merge_cmd(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT LoRA adapter folders on one base")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (must not exist or be empty)")],
    method: Annotated[str, typer.Option(help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, "
                                             "or an _svd form (ties_svd, ...)")] = "cat",
    weights: Annotated[str | None, typer.Option(help="one weight per adapter, e.g. 1,0.5 (default 1 each)")] = None,
    density: Annotated[float | None, typer.Option(help="kept fraction for ties/dare/magnitude_prune")] = None,
    majority_sign: Annotated[str, typer.Option(help="ties/dare_ties sign election: total or frequency")] = "total",
    svd_rank: Annotated[int | None, typer.Option(help="output rank of the _svd methods")] = None,
    name: Annotated[str, typer.Option(help="the merged adapter's name")] = "merged",
    model: Annotated[str | None, typer.Option("--model", "-m", help="the base (default: the adapters')")] = None,
    unload: Annotated[bool, typer.Option("--unload", help="merge ONE adapter into its base: an HF folder")] = False,
    tenants: Annotated[int | None, typer.Option(help="also report storage for N tenants")] = None,
) -> None:
    """Merge LoRA adapters on one base into one adapter (PEFT), or one adapter into its base (--unload)."""
    from tunelab.merge import merge

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise TunelabError(f"--weights {weights!r}: give numbers separated by commas, e.g. 1,0.5.") from None
    options = {} if unload else dict(method=method, weights=w, density=density, majority_sign_method=majority_sign,
                                      svd_rank=svd_rank, name=name)
    out.print(escape(merge(adapters, out_dir, unload=unload, tenants=tenants, model=model, **options).text()))


@app.command("export")
def export_cmd(
    source: Annotated[str, typer.Argument(help="model (spec, folder, .gguf) or PEFT adapter folder")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (must not exist or be empty)")],
    format: Annotated[str, typer.Option("--format", "-f", help="hf, gguf, gguf-lora or vllm")] = "gguf",
    quant: Annotated[str, typer.Option(help="GGUF type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1")] = "f16",
    model: Annotated[str | None, typer.Option("--model", "-m", help="an adapter's base (default: its own)")] = None,
    pre_tokenizer: Annotated[str | None, typer.Option(help="llama.cpp pre-tokenizer name, if not recognised")]
    = None,
    max_lora_rank: Annotated[int, typer.Option(help="vLLM --max-lora-rank to check the adapter against")] = 16,
) -> None:
    """Export a model or adapter as an HF folder, a GGUF (+ Ollama Modelfile), a LoRA GGUF, or a vLLM adapter."""
    from tunelab.export import export

    out.print(escape(export(source, out_dir, format, quant, model, pre_tokenizer, max_lora_rank).text()))


def main() -> None:
    """Entry point: run the app, turning TunelabError into a one-paragraph message and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except TunelabError as e:
        if STATE["debug"]:
            raise
        # soft_wrap: the terminal wraps the paragraph, so a long file:line is never cut in two
        Console(stderr=True).print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if STATE["debug"]:
            raise
        Console(stderr=True).print(f"[bold red]error:[/bold red] {type(e).__name__}: {e} (rerun with --debug "
                                   "for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
