"""The production loop's commands: `tunelab rollout` (canary versions of an adapter alias: weights, status,
promote, rollback, history) and `tunelab monitor` (drift of an adapter's traffic). Other ops commands join this
module as their own Typer groups."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Column, Table

from tunelab.cli._app import JsonOpt, _print_json, app, out, say

rollout_app = typer.Typer(help="Canary rollouts: serve versions NAME@v1, NAME@v2 of an adapter under one name by "
                               "weights, compare them on the request log, promote or roll back.",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

AliasArg = Annotated[str, typer.Argument(help="the alias: the model name clients ask for (folders NAME@vN)")]
AdaptersOpt = Annotated[Path | None, typer.Option(
    "--adapters", help="the server's adapter root: checks the versions are there and links them in the lineage "
                       "(remembered for the alias)")]


def _weights(r) -> str:
    from tunelab.ops.rollout import weights_text

    return weights_text(r.weights)


@rollout_app.command("set")
def rollout_set(alias: AliasArg,
                weights: Annotated[list[str], typer.Argument(help="VERSION=WEIGHT..., e.g. v1=90 v2=10")],
                adapters: AdaptersOpt = None) -> None:
    """Route the alias's requests by these weights; a running server picks them up within a second. Each caller
    (the request's `user`, else its API key) stays on one version while the weights stay."""
    from tunelab.ops.rollout import set_weights

    r = set_weights(alias, weights, root=adapters)
    say(f"{alias}: {_weights(r)} (stable {r.stable}; rollout #{r.event['id']})")


@rollout_app.command("promote")
def rollout_promote(alias: AliasArg, version: Annotated[str, typer.Argument(help="the version to serve: v2")],
                    adapters: AdaptersOpt = None) -> None:
    """Send all of the alias's traffic to VERSION and make it the stable version (one registry transaction)."""
    from tunelab.ops.rollout import promote

    r = promote(alias, version, root=adapters)
    say(f"{alias}: promoted {version}: {_weights(r)} (rollout #{r.event['id']})")


@rollout_app.command("rollback")
def rollout_rollback(alias: AliasArg,
                     version: Annotated[str | None, typer.Argument(help="default: the stable version")] = None,
                     adapters: AdaptersOpt = None) -> None:
    """Send all of the alias's traffic back to its stable version (one registry transaction)."""
    from tunelab.ops.rollout import rollback

    r = rollback(alias, version, root=adapters)
    say(f"{alias}: rolled back to {r.stable}: {_weights(r)} (rollout #{r.event['id']})")


@rollout_app.command("history")
def rollout_history(alias: AliasArg, as_json: JsonOpt = False) -> None:
    """Every change to the alias's weights: which version served when."""
    from tunelab.ops.rollout import history, weights_text

    rows = history(alias)
    if as_json:
        return _print_json(rows)
    t = Table("#", "when (UTC)", "action", "weights", "stable", "by", "registry id")
    for e in rows:
        t.add_row(str(e["id"]), _when(e["at"]), e["action"], weights_text(e["weights"]), e["stable"],
                  escape(str(e["actor"] or "")), str(e["artifact"] or ""))
    out.print(t)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@rollout_app.command("status")
def rollout_status(
    alias: AliasArg,
    log: Annotated[str | None, typer.Option(help="the request log: a SQLite file or postgresql:// URL (default: "
                                                 "requests.sqlite beside the registry, as `tunelab serve`)")] = None,
    since: Annotated[str | None, typer.Option(help="only the last 24h, 30m, 7d... (default: since the canary "
                                                   "got its first weight)")] = None,
    alpha: Annotated[float, typer.Option(help="false-alarm rate over all signals and all looks")] = 0.05,
    tenant: Annotated[str | None, typer.Option(help="only this tenant's requests")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare the canary with the stable version on the request log (finish reasons, structured output,
    failures, output-check flags, feedback, latency) with an always-valid sequential test, and say promote,
    hold or rollback. Exits 1 on rollback (for cron)."""
    from tunelab.ops.rollout import status, weights_text

    start = None
    if since is not None:
        from tunelab.ops.monitor import parse_duration

        start = time.time() - parse_duration(since)
    s = status(alias, log_url=log, since=start, alpha=alpha, tenant=tenant)
    if as_json:
        _print_json(s)
    else:
        counts = ", ".join(f"{v}: {n}" for v, n in s["requests"].items()) or "none"
        say(f"{alias}: {weights_text(s['weights'])} (stable {s['stable']}); requests since {_when(s['since'])} "
            f"UTC: {counts}")
        for version, rows in s["comparisons"].items():
            t = Table(*(Column(c, no_wrap=True) for c in ("signal", s["stable"], version, "diff", "always-valid CI",
                                                          "p", "verdict")), box=box.SIMPLE_HEAD, pad_edge=False,
                      title=f"{version} against {s['stable']} (alpha {s['alpha']:g} over {len(rows)} signals; "
                            "--json has the counts)")
            for r in rows:
                ci = "-" if r["lo"] != r["lo"] else f"[{r['lo']:+.2g}, {r['hi']:+.2g}]"
                t.add_row(r["signal"], f"{r['base']:.3g}", f"{r['canary']:.3g}", f"{r['diff']:+.2g}", ci,
                          f"{r['p_value']:.2g}", r["verdict"])
            out.print(t)
        target = f" {s['version']}" if s["version"] else ""
        say(f"decision: {s['decision']}{target}")
        for reason in s["reasons"]:
            say(f"  {reason}")
    if s["decision"] == "rollback":
        raise typer.Exit(1)


@app.command()
def monitor(
    adapter: Annotated[str, typer.Argument(help="the served adapter's name, as the request log records it "
                                                "(e.g. orders@v2)")],
    since: Annotated[str, typer.Option(help="the window: the last 24h, 30m, 7d ...")] = "24h",
    baseline: Annotated[str, typer.Option(help="latency and feedback compare with this span before the window")]
    = "7d",
    log: Annotated[str | None, typer.Option(help="the request log: a SQLite file or postgresql:// URL (default: "
                                                 "requests.sqlite beside the registry, as `tunelab serve`)")] = None,
    run: Annotated[Path | None, typer.Option(help="the adapter's training run folder (default: ADAPTER under "
                                                  "--adapters, else the registry's newest adapter of that name)")]
    = None,
    adapters: Annotated[Path | None, typer.Option(help="the server's adapters folder")] = None,
    evals: Annotated[list[Path] | None, typer.Option("--eval", help="an eval folder of the adapter (repeatable; "
                                                     "default: the evals the registry links to it)")] = None,
    alpha: Annotated[float, typer.Option(help="false-alarm rate over all signals (Holm)")] = 0.01,
    as_json: JsonOpt = False,
    html: Annotated[bool, typer.Option("--html", help="also write report.html and print its path")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="where the report goes (default: "
                                                 "$TUNELAB_HOME/monitor/ADAPTER, which /metrics exports)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the permutation test and the bootstrap CIs")] = 0,
) -> None:
    """Drift: compare a window of ADAPTER's logged traffic with what it was trained and evaluated on (input
    embeddings, prompt lengths, length_closed, schema failures, refusals, feedback, latency); a verdict per
    signal, a report, exit 1 on an alert (for cron)."""
    from tunelab.ops.monitor import (
        monitor_dir,
        parse_duration,
        reference_for_adapter,
        resolve_run_folder,
        run_monitor,
    )
    from tunelab.ops.requestlog import RequestLog

    ref = reference_for_adapter(run or resolve_run_folder(adapter, adapters), evals or [])
    store = RequestLog.open(log)
    try:
        report = run_monitor(adapter, store, ref, parse_duration(since), baseline_s=parse_duration(baseline),
                             alpha=alpha, seed=seed)
    finally:
        store.close()
    paths = report.write(out_dir or monitor_dir(adapter), html=html)
    if as_json:
        _print_json(report.to_dict())
    else:
        _monitor_table(report)
        if html:
            say(f"report: {paths['html']}")
    if report.alert:
        raise typer.Exit(1)


def _monitor_table(report) -> None:
    def num(v) -> str:
        return "-" if v is None else f"{v:.3g}"

    t = Table(Column("signal", no_wrap=True), "verdict", "n", Column("window [95% CI]", no_wrap=True), "ref",
              "p", "p (Holm)", title=f"{report.adapter}: {report.rows} requests ({report.content_rows} with "
                                     f"content), {_when(report.since)} to {_when(report.until)} UTC")
    for s in report.signals:
        ci = "" if s.ci is None else f" [{s.ci[0]:.3g}, {s.ci[1]:.3g}]"
        verdict = "[bold red]ALERT[/]" if s.verdict == "alert" else s.verdict
        t.add_row(s.name, verdict, str(s.n), num(s.value) + ci, num(s.reference), num(s.p_value), num(s.p_adjusted))
    out.print(t)
    for s in report.signals:
        say(f"  {s.name}: {s.method + '; ' if s.method else ''}{s.note}")
    say(f"{'ALERT: ' + ', '.join(report.alerts) if report.alert else 'no alert'} (Holm over the tested signals, "
        f"family-wise alpha {report.alpha:g}; reference: {report.reference})")
