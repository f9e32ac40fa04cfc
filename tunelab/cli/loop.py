"""Closing the loop: `tunelab review` (the review queue in a terminal), `tunelab data from-logs` (reviewed answers
to training rows) and `tunelab loop` (reviewed rows -> train -> evaluate -> gate -> NAME@v(n+1) -> canary)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape

from tunelab.cli._app import JsonOpt, _print_json, app, data_app, say

LogOpt = Annotated[str | None, typer.Option(help="the request log: a SQLite file or postgresql:// URL (default: "
                                                 "requests.sqlite beside the registry, as `tunelab serve`)")]
TenantOpt = Annotated[str | None, typer.Option(help="only this tenant's requests")]
AdapterArg = Annotated[str, typer.Argument(help="the adapter: an alias (orders), a version (orders@v1) or a folder")]


def _since(text: str | None) -> float | None:
    import time

    from tunelab.ops.monitor import parse_duration

    return None if text is None else time.time() - parse_duration(text)


KeysOpt = Annotated[Path | None, typer.Option("--keys", help="the server's keys.yaml: its tenants' own `redact` "
                                                                "patterns apply too (all tenants', or --tenant's)")]


def _redact_patterns(keys: Path | None, tenant: str | None) -> tuple[tuple[str, str], ...]:
    """keys.yaml's extra redaction patterns: the tenant's, or every tenant's when none is named."""
    if keys is None:
        return ()
    from tunelab.server.auth import Keys

    tenants = {t.name: t for t in Keys.load(keys).by_hash.values()}
    if tenant is not None and tenant not in tenants:
        raise typer.BadParameter(f"--tenant {tenant}: not a tenant of {keys} ({', '.join(sorted(tenants))})")
    chosen = [tenants[tenant]] if tenant else list(tenants.values())
    return tuple(dict.fromkeys(p for t in chosen for p in t.redact))


def _ask(text: str, default: str | None = None) -> str | None:
    """A line from the terminal; None at end of input."""
    try:
        return typer.prompt(text, default=default, show_default=default not in (None, ""))
    except click.exceptions.Abort:
        return None


def _review_one(item, rubric: list[str], reviewer: str | None):
    """Ask for one item's verdict, correction, rubric and comment; a Review, "skip" or None (quit)."""
    from tunelab.ops.monitor import last_user_text
    from tunelab.ops.review import Review

    r = item.row
    say(f"\n[bold]{escape(r.response_id)}[/] ({escape(r.adapter or r.model)}; {', '.join(item.reasons)}"
        f"{'; flags ' + ', '.join(r.flags) if r.flags else ''}; outcome {r.outcome})")
    say(f"[bold]prompt:[/] {escape(last_user_text(r.prompt) or '')}")
    say(f"[bold]answer:[/] {escape(r.answer or '')}")
    while True:
        key = _ask("verdict: [a]ccept [c]orrect [r]eject [s]kip [q]uit")
        if key is None or key.strip().lower() in ("q", "quit"):
            return None
        verdict = {"a": "accept", "c": "correct", "r": "reject", "s": "skip"}.get(key.strip().lower()[:1])
        if verdict:
            break
    if verdict == "skip":
        return "skip"
    correction = _ask("the right answer") if verdict == "correct" else None
    marks = {}
    for req in rubric:
        marks[req] = (_ask(f"  {req}: pass? [y/n]", "y") or "y").strip().lower().startswith("y")
    comment = _ask("comment", "") or None
    return Review(verdict, correction=correction, rubric=marks, comment=comment, reviewer=reviewer)


@app.command()
def review(
    adapter: AdapterArg,
    log: LogOpt = None,
    tenant: TenantOpt = None,
    since: Annotated[str | None, typer.Option(help="only requests of the last 24h, 7d ...")] = None,
    size: Annotated[int, typer.Option(help="items in the queue")] = 20,
    random_share: Annotated[float, typer.Option(help="share of the queue drawn at random (the rest: flagged, "
                                                     "low feedback, drift, length_closed)")] = 0.2,
    seed: Annotated[int, typer.Option(help="seed of the random share")] = 0,
    rubric: Annotated[list[str] | None, typer.Option("--rubric", help="a requirement each answer is marked "
                                                     "pass/fail on (repeatable; default: a generic four)")] = None,
    reviewer: Annotated[str | None, typer.Option(help="your name, stored with each review")] = None,
    list_only: Annotated[bool, typer.Option("--list", help="print the queue and ask nothing")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Review ADAPTER's logged answers in the terminal: accept, correct (type the right answer) or reject each,
    mark the rubric, comment. Reviews are stored as feedback on the response, as the web UI's Review page does."""
    import getpass

    from tunelab.ops.requestlog import RequestLog
    from tunelab.ops.review import DEFAULT_RUBRIC, build_queue, save_review

    store = RequestLog.open(log)
    try:
        queue = build_queue(store, adapter, tenant=tenant, since=_since(since), size=size,
                            random_share=random_share, seed=seed)
        if list_only:
            if as_json:
                return _print_json([it.to_dict() for it in queue])
            for it in queue:
                say(f"{escape(it.row.response_id)}  {', '.join(it.reasons)}")
            return
        done = 0
        for item in queue:
            got = _review_one(item, list(rubric or DEFAULT_RUBRIC), reviewer or getpass.getuser())
            if got is None:
                break
            if got != "skip":
                save_review(store, item.row.response_id, got, tenant=tenant)
                done += 1
        say(f"{done} reviewed, {len(queue) - done} left in this queue")
    finally:
        store.close()



@data_app.command("from-logs")
def data_from_logs(
    adapter: AdapterArg,
    out: Annotated[Path, typer.Option("--out", help="the JSONL file to write (chat rows with `origin`)")],
    since: Annotated[str | None, typer.Option(help="only reviews of the last 24h, 7d ...")] = None,
    log: LogOpt = None,
    tenant: TenantOpt = None,
    run: Annotated[Path | None, typer.Option(help="the adapter's training run folder (default: ADAPTER under "
                                                  "--adapters, else the registry's newest adapter of that name)")]
    = None,
    adapters: Annotated[Path | None, typer.Option(help="the server's adapters folder")] = None,
    test: Annotated[Path | None, typer.Option(help="the golden test set (a chat JSONL or task folder; default: "
                                                   "the test split of the task the adapter trained on)")] = None,
    drop_test_overlap: Annotated[bool, typer.Option("--drop-test-overlap", help="leave out reviewed answers to "
                                                    "golden test questions instead of refusing")] = False,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accepted and corrected answers of ADAPTER's reviewed traffic as chat training rows (with their request
    ids and reviewers), redacted, without questions the adapter already trained on; refused when a row asks a
    golden test question. Registered in the runs registry, made from the adapter."""
    from tunelab.ops.from_logs import from_logs
    from tunelab.ops.monitor import resolve_run_folder
    from tunelab.ops.requestlog import RequestLog

    folder = run or resolve_run_folder(adapter, adapters)
    store = RequestLog.open(log)
    try:
        res = from_logs(adapter, folder, out, log=store, since=_since(since), tenant=tenant, test=test,
                        drop_test_overlap=drop_test_overlap, redact_extra=_redact_patterns(keys, tenant))
    finally:
        store.close()
    if as_json:
        return _print_json(res.to_dict())
    c = res.counts
    say(f"{res.path}: {len(res.rows)} row(s) from {c['reviewed']} reviews ({c['accept']} accepted, {c['correct']} "
        f"corrected, {c['reject']} rejected); left out: {c['in_train']} already in the training data, "
        f"{c['merged']} merged repeats, {c['test_overlap']} golden test questions; registry dataset "
        f"#{res.dataset_id}")


@app.command("loop")
def loop_cmd(
    adapter: Annotated[str, typer.Argument(help="the current version: NAME@vN (a folder under --adapters) or its "
                                                "run folder")],
    adapters: Annotated[Path | None, typer.Option(help="the server's adapters folder (NAME@v1, NAME@v2 ...)")] = None,
    log: LogOpt = None,
    tenant: TenantOpt = None,
    since: Annotated[str | None, typer.Option(help="only reviews of the last 24h, 7d ...")] = None,
    out: Annotated[Path | None, typer.Option(help="the loop folder (default: $TUNELAB_HOME/loops/NAME@v(n+1)); a "
                                                  "rerun resumes at the step that failed")] = None,
    test: Annotated[Path | None, typer.Option(help="the golden test set (default: the adapter's task's test "
                                                   "split)")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="a recipe override key=value for the "
                                                        "retraining (repeatable), e.g. train.max_steps=40")] = None,
    limit: Annotated[int | None, typer.Option(help="golden test examples to evaluate (default: all)")] = None,
    probes: Annotated[bool, typer.Option(help="run the regression and safety probes")] = True,
    min_gain: Annotated[float, typer.Option(help="points the held-out new traffic must gain")] = 0.0,
    canary: Annotated[float, typer.Option(help="percent of the alias's traffic for the new version")] = 10.0,
    drop_test_overlap: Annotated[bool, typer.Option("--drop-test-overlap", help="leave out reviewed answers to "
                                                    "golden test questions instead of refusing")] = False,
    keys: KeysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reviewed traffic -> retrain on the adapter's recipe and data plus the reviewed rows -> evaluate (golden
    test set, held-out new traffic, regression and safety probes) -> gate -> NAME@v(n+1) -> a canary -> report.
    Exits 1 when the gate stops it (with the reason and the numbers)."""
    from tunelab.ops.loop import GateFailed, Loop, LoopConfig, current_folder

    folder = Path(adapter) if Path(adapter).is_dir() else current_folder(adapter, adapters or Path("."))
    if not folder.is_dir():
        raise typer.BadParameter(f"no adapter folder {folder}; give NAME@vN with --adapters DIR, or the folder")
    cfg = LoopConfig(folder=folder.resolve(), out=out, log=log, since=_since(since), tenant=tenant, test=test,
                     drop_test_overlap=drop_test_overlap, redact=_redact_patterns(keys, tenant),
                     train_overrides=list(overrides or []), limit=limit,
                     probes=probes, min_gain=min_gain, canary=canary)
    try:
        report = Loop(cfg).run()
    except GateFailed as e:
        if as_json:
            _print_json(e.result)
        else:
            say(f"[bold red]gate failed[/]: {escape('; '.join(e.result['reasons']))}")
            _gate_lines(e.result)
        raise typer.Exit(1) from None
    if as_json:
        return _print_json(report)
    d = report["data"]
    say(f"data: {d['reviewed_rows']} reviewed rows ({d['heldout_rows']} held out as new traffic), mixed x"
        f"{d['repeat']} into {d['original_train_rows']} rows of the adapter's own data: {d['train']}")
    say(f"trained: {report['train']['folder']}")
    _gate_lines(report["gate"])
    say(f"registered {report['to']}: {report['register']['folder']}")
    c = report["canary"]
    say(f"canary: {', '.join(f'{v}={w:g}' for v, w in c['weights'].items())} (stable {c['stable']}); watch it "
        f"with: tunelab rollout status {report['alias']}")


def _gate_lines(g: dict) -> None:
    for part in ("golden", "traffic"):
        ch = g[part]
        say(f"  {part}: {ch['delta_points']:+.1f} points, 95% CI [{ch['ci95_points'][0]:+.1f}, "
            f"{ch['ci95_points'][1]:+.1f}] over {g['n'][part]} examples")
    if g.get("probes"):
        say("  probes: " + ", ".join(f"{k} {'FLAGGED' if v else 'ok'}" for k, v in g["probes"].items()))


prompts_app = typer.Typer(help="Versioned prompts: a task's system prompt, template and few-shot sets, and the "
                               "system prompt an alias serves with, registered by hash.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")


@prompts_app.command("register")
def prompts_register(task: Annotated[str, typer.Argument(help="a bundled task name or task folder")],
                     few_shot: Annotated[int, typer.Option(help="also register the first N train examples as a "
                                                                "few-shot set")] = 0,
                     as_json: JsonOpt = False) -> None:
    """Register TASK's system prompt and template (and a few-shot set) by hash; print their versions."""
    from tunelab.ops.prompts import register_task_prompts
    from tunelab.tasks.task import load_task

    t = load_task(task)
    got = register_task_prompts(t, t.examples("train", limit=few_shot) if few_shot else [])
    if as_json:
        return _print_json({r: pv.to_dict() for r, pv in got.items()})
    for role, pv in got.items():
        say(f"{role}: {pv.version} (registry #{pv.id})")


@prompts_app.command("alias")
def prompts_alias(alias: Annotated[str, typer.Argument(help="the alias (the model name clients ask for)")],
                  file: Annotated[Path | None, typer.Option(help="set its system prompt to this file's text")] = None,
                  as_json: JsonOpt = False) -> None:
    """Show the system prompt ALIAS serves with and its versions; with --file, set a new one (recorded)."""
    from tunelab.ops.prompts import alias_prompt, set_alias_prompt

    if file is not None:
        set_alias_prompt(alias, file.read_text(encoding="utf-8"))
    now = alias_prompt(alias)
    if as_json:
        return _print_json(now)
    if now is None:
        say(f"{alias}: no system prompt set (tunelab prompts alias {alias} --file PROMPT.txt)")
        return
    say(f"{alias}: system prompt {now['version']}; versions: " + ", ".join(h["version"] for h in now["history"]))
    say(escape(now["text"] or ""))


@app.command("upgrade")
def upgrade_cmd(
    base: Annotated[str, typer.Option("--from", help="the base model adapters were trained on (spec, path, hash)")],
    new: Annotated[str, typer.Option("--to", help="the base model to retrain them on")],
    out: Annotated[Path, typer.Option(help="where the retrained adapters, evals and upgrade.md go")] = Path(
        "runs/upgrade"),
    overrides: Annotated[list[str] | None, typer.Option("--set", help="a recipe override key=value for every "
                                                        "retraining (repeatable)")] = None,
    limit: Annotated[int | None, typer.Option(help="test examples per task (default: all)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Retrain every adapter the registry records on BASE from its recorded recipe and data on NEW, evaluate
    old (on BASE) and new (on NEW) on the adapter's task, and write one report with a recommendation each."""
    from tunelab.ops.upgrade import upgrade

    report = upgrade(base, new, out, overrides=list(overrides or []), limit=limit)
    if as_json:
        return _print_json(report)
    for r in report["adapters"]:
        name = Path(r["adapter"]).name
        if "skipped" in r:
            say(f"{escape(name)}: skipped ({r['skipped']})")
            continue
        c = r["change"]
        say(f"{escape(name)} ({r['task']}, {r['metric']}, n={r['n']}): {r['old']:.3f} -> {r['new']:.3f}, "
            f"{c['delta_points']:+.1f} points [{c['ci95_points'][0]:+.1f}, {c['ci95_points'][1]:+.1f}]: "
            f"{r['recommendation']}")
    say(f"report: {out / 'upgrade.md'}")
