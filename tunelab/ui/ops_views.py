"""The Serve page's canary rollouts (tunelab.ops.rollout: weights, the always-valid comparison, promote and
roll back) and the Monitor page's drift reports (tunelab.ops.monitor's latest report per adapter), as HTML."""

from __future__ import annotations

import time

from tunelab.errors import TunelabError
from tunelab.runs.html_page import esc, score_td, table, td
from tunelab.server.auth import Tenant
from tunelab.ui.shell import button, field, link, url


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _comparison_rows(status: dict) -> list[list[str]]:
    rows = []
    for version, results in status["comparisons"].items():
        for r in results:
            ci = None if r.get("lo") is None or r["lo"] != r["lo"] else [r["lo"], r["hi"]]  # nan before a look
            rows.append([td(f"{version} vs {status['stable']}", ""), td(r["signal"], ""), td(_num(r.get("base"))),
                         td(_num(r.get("canary"))), score_td(r.get("diff"), ci, "always-valid", digits=4),
                         td(_num(r.get("p_value"))), td(r["verdict"], "")])
    return rows


def _forms(alias: str, weights: dict, versions: list[str]) -> str:
    action = url("serve/rollout", alias)
    text = " ".join(f"{v}={w:g}" for v, w in weights.items())
    opts = [(v, v) for v in versions]
    return ('<div class="row">'
            f'<form class="box" method="post" action="{action}"><input type=hidden name=action value=set>'
            + field("Weights (version=percent ...)", f"weights-{alias}", value=text) + button("Set split") + "</form>"
            f'<form class="box" method="post" action="{action}"><input type=hidden name=action value=promote>'
            + field("Version", f"promote-{alias}", "select", versions[-1] if versions else "", options=opts)
            + button("Promote") + "</form>"
            f'<form class="box" method="post" action="{action}"><input type=hidden name=action value=rollback>'
            + button("Roll back to the stable version", "danger") + "</form></div>")


def rollout_section(t: Tenant, log_url: str | None, served: dict[str, list[str]]) -> list[str]:
    """Each alias the tenant may use: its weights, requests per version, each canary against the stable version
    and the decision (what `tunelab rollout status` prints); admins get the forms that change it."""
    from tunelab.ops import rollout

    aliases = sorted(set(rollout.all_weights()) | set(served))
    out = []
    for alias in (a for a in aliases if t.may_use(a)):
        cur = rollout.get(alias)
        if cur is None:
            out.append(f"<h3>{esc(alias)}</h3><p class=note>versions {esc(', '.join(served.get(alias, [])))}; no split "
                       "set: the lowest version serves everything.</p>")
        else:
            try:
                st = rollout.status(alias, log_url=log_url, tenant=None if t.admin else t.name)
            except TunelabError as e:
                st = {"requests": {}, "comparisons": {}, "decision": "-", "reasons": [str(e)], "stable": cur.stable}
            weights = " ".join(f"{v}={w:g}" for v, w in cur.weights.items())
            out += [f'<h3>{esc(alias)}</h3><p>Split <b id="split-{esc(alias)}">{esc(weights)}</b>, stable '
                    f"{esc(cur.stable)}, since {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(cur.started_at))}; "
                    f"requests {esc(st['requests'] or 'none yet')}.</p>",
                    f'<p class="verdict">{esc(st["decision"])}: {esc("; ".join(st["reasons"]))}</p>']
            rows = _comparison_rows(st)
            if rows:
                out.append(table(["versions", "signal", "stable", "canary", "difference [95% CI]", "p", "verdict"],
                                 rows))
        if t.admin:
            versions = served.get(alias) or sorted(cur.weights if cur else [], key=lambda v: int(v[1:]))
            out.append(_forms(alias, cur.weights if cur else {}, versions))
    return out or ['<p class="note">No adapter versions (NAME@v1, NAME@v2 folders) and no rollouts yet.</p>']


def change_rollout(alias: str, action: str, form: dict, root, actor: str):
    """Set weights, promote or roll back, with the same functions as `tunelab rollout ...`."""
    from tunelab.ops import rollout

    if action == "set":
        return rollout.set_weights(alias, (form.get(f"weights-{alias}") or "").split(), root=root, actor=actor)
    if action == "promote":
        return rollout.promote(alias, form.get(f"promote-{alias}") or "", root=root, actor=actor)
    if action == "rollback":
        return rollout.rollback(alias, root=root, actor=actor)
    raise TunelabError(f"unknown rollout action {action!r}: set, promote or rollback")


def monitor_reports(t: Tenant) -> list[str]:
    """The latest `tunelab monitor` report of each adapter the tenant may use: verdict per signal with its CI and
    p-values (Holm), alerts first."""
    from tunelab.ops.monitor import latest_states

    states = [s for s in latest_states() if t.may_use(s.get("adapter", ""))]
    if not states:
        return ['<h2>Drift reports</h2><p class="note">No monitor reports yet: `tunelab monitor ADAPTER` (e.g. from '
                "cron) writes one per adapter.</p>"]
    out = ["<h2>Drift reports</h2>"]
    for s in sorted(states, key=lambda s: (not s.get("alert"), s.get("adapter", ""))):
        alerts = [x["name"] for x in s.get("signals", []) if x.get("verdict") == "alert"]
        span = time.strftime("%Y-%m-%d %H:%M", time.gmtime(s.get("until", 0)))
        out.append(f"<h3>{esc(s['adapter'])}</h3><p class=\"verdict\">{'ALERT: ' + esc(', '.join(alerts)) if alerts else 'no alert'}"
                   f" · {s.get('rows', 0)} requests to {esc(span)} UTC · "
                   f"{link(url('monitor/report', s['adapter']), 'report')}</p>")
        rows = [[td(x["name"], ""), td(x["verdict"].upper() if x["verdict"] == "alert" else x["verdict"], ""),
                 td(x.get("n", 0)), score_td(x.get("value"), x.get("ci"), digits=4), td(_num(x.get("reference"))),
                 td(_num(x.get("p_value"))), td(_num(x.get("p_adjusted")))] for x in s.get("signals", [])]
        out.append(table(["signal", "verdict", "n", "window [95% CI]", "reference", "p", "p (Holm)"], rows))
    return out
