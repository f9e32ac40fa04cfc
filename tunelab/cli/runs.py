"""`tunelab runs`: the run registry's list, show, compare, lineage and register."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from tunelab.cli._app import JsonOpt, _print_json, app, out

runs_app = typer.Typer(help="The run registry: what was trained and evaluated, and what it was made from.",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")


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

