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


COLUMNS = ("id", "kind", "name", "hash", "score", "created", "path")
MIN_WIDTH = {"path": 12, "score": 11, "name": 12}  # the columns that shrink to fit (in this order), how far
CLIP = {"name": "name", "score": "start", "path": "end"}  # which part of a clipped value stays (the middle goes otherwise)


def _short_name(name: str) -> str:
    """A registered name as a person reads it: a hub cache folder as org/model, another path as its last part."""
    if "/" not in name or not name.startswith(("/", "~", ".")):
        return name
    parts = [p for p in Path(name).parts if p not in ("/", "")]
    hub = next((p for p in parts if p.startswith("models--")), None)
    if hub:
        return hub[len("models--"):].replace("--", "/")
    return "/".join(parts[-2:]) if parts and parts[-1].startswith("v") and parts[-1][1:].isdigit() else parts[-1]


def _short_path(path: str) -> str:
    p = Path(path)
    for root, mark in ((Path.cwd(), "."), (Path.home(), "~")):
        if p.is_relative_to(root) and p != root:
            return f"{mark}/{p.relative_to(root)}"
    return path


def _clip(text: str, width: int, keep: str = "middle") -> str:
    """`text` in at most `width` characters: an ellipsis replaces its middle, or (keep="start" / "end") what
    follows the start / precedes the end; keep="name" drops an org/ prefix first."""
    if len(text) <= width:
        return text
    if keep == "name" and "/" in text:  # org/model: the model says more than the org
        return _clip(text.rsplit("/", 1)[1], width)
    head = {"start": width - 1, "end": 0}.get(keep, (width - 1) // 2)
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _cells(r: dict, wide: bool) -> dict[str, str]:
    score = (f"{r['primary_score']:.3f} {r['primary_metric']}" if r.get("primary_score") is not None else "")
    name, path, created = str(r["name"] or ""), str(r["path"] or ""), str(r["created_at"] or "")
    if wide:
        return {"id": str(r["id"]), "kind": r["kind"], "name": name, "hash": r["hash"] or "", "score": score,
                "created": created, "path": path}
    return {"id": str(r["id"]), "kind": r["kind"], "name": _short_name(name), "hash": (r["hash"] or "")[:8],
            "score": score, "created": created[5:16].replace("T", " "), "path": _short_path(path)}


def _fit(natural: dict[str, int], width: int) -> dict[str, int]:
    """Column widths within `width`: the path gives way first, then the score, then the name, each down to
    its MIN_WIDTH; the other columns keep their natural width."""
    widths = dict(natural)
    for col in MIN_WIDTH:
        widths[col] = max(min(widths[col], MIN_WIDTH[col]), widths[col] - (sum(widths.values()) - width))
    return widths


def runs_lines(rows: list[dict], width: int, wide: bool = False) -> list[str]:
    """The `runs list` table as lines for a terminal `width` columns wide: a header, then one line per
    artifact, short names and paths clipped to fit so no column is squeezed away; wide: every value in full
    (lines as long as they need)."""
    cells = [_cells(r, wide) for r in rows]
    natural = {c: max([len(c)] + [len(x[c]) for x in cells]) for c in COLUMNS}
    widths = natural if wide else _fit(natural, width - 2 * (len(COLUMNS) - 1))  # 2 spaces between columns
    table = [dict(zip(COLUMNS, COLUMNS))] + [{c: _clip(x[c], widths[c], CLIP.get(c, "middle")) for c in COLUMNS}
                                             for x in cells]
    return ["  ".join(x[c].ljust(widths[c]) for c in COLUMNS).rstrip() for x in table]


def runs_tsv(rows: list[dict]) -> str:
    """`runs list` for a pipe: a header, then one tab-separated line per artifact, every value in full."""
    head = ("id", "kind", "name", "hash", "metric", "score", "created", "path")
    lines = ["\t".join(head)]
    for r in rows:
        vals = (r["id"], r["kind"], r["name"], r["hash"], r.get("primary_metric"), r.get("primary_score"),
                r["created_at"], r["path"])
        lines.append("\t".join("" if v is None else " ".join(str(v).split()) for v in vals))
    return "\n".join(lines)


@runs_app.command("list")
def runs_list(
    kind: Annotated[str | None, typer.Option(help="only this kind: run, adapter, eval, base_model, dataset, ...")]
    = None,
    limit: Annotated[int | None, typer.Option(help="newest N")] = None,
    wide: Annotated[bool, typer.Option("--wide", help="full names, hashes and paths (lines may exceed the "
                                                      "terminal)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Registered artifacts, newest first: a table on a terminal, tab-separated lines when piped."""
    from tunelab.runs import list_artifacts

    rows = list_artifacts(kind, limit)
    if as_json:
        return _print_json(rows)
    if not out.is_terminal:
        return typer.echo(runs_tsv(rows))
    head, *lines = runs_lines(rows, out.width, wide)
    out.print(head, style="bold", markup=False, highlight=False, soft_wrap=True)
    for line in lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)


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
    rows = {**c["metrics"], **{f"failures: {k}": v for k, v in c["failures"].items()},
            **{f"prompt: {k}": v for k, v in c.get("prompts", {}).items()}}  # a prompt change shows as a version
    for m, scores in rows.items():
        t.add_row(m, *["-" if s is None else f"{s:.4f}" if isinstance(s, float) else str(s) for s in scores])
    out.print(t)


@runs_app.command("lineage")
def runs_lineage(ref: Annotated[str, typer.Argument(help="adapter (or eval, merge, ...): id or folder")],
                 as_json: JsonOpt = False) -> None:
    """Walk back from an artifact to the base model, datasets, recipe and prompts that made it."""
    from tunelab.runs import lineage

    tree = lineage(ref)
    if as_json:
        return _print_json(tree)
    out.print(lineage_tree(tree))


def lineage_tree(tree: dict, title: str = ""):
    """A lineage (tunelab.runs.lineage) as a rich Tree: role, kind, id, name and hash of each artifact."""
    from rich.tree import Tree

    def label(n: dict) -> str:
        role = f"[dim]{n['role']}:[/dim] " if n["role"] else ""
        h = f" [dim]{n['hash'][:12]}[/dim]" if n["hash"] else ""
        return f"{role}[bold]{n['kind']}[/bold] #{n['id']} {escape(str(n['name'] or n['path'] or ''))}{h}"

    def grow(node: Tree, n: dict) -> None:
        for p in n["parents"]:
            grow(node.add(label(p)), p)

    root = Tree(title + label(tree))
    grow(root, tree)
    return root


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

