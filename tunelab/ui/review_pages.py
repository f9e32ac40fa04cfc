"""The Review page: an adapter's review queue (tunelab.ops.review: flagged, low-rated, drifting, cut-off answers
and a random share), each answer accepted, corrected or rejected against the rubric, with keyboard shortcuts;
stored as `tunelab review` stores it, so `tunelab data from-logs` turns it into training rows."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tunelab.errors import TunelabError
from tunelab.ops import review as rv
from tunelab.runs.html_page import esc, table, td, text_cell
from tunelab.server.auth import Tenant
from tunelab.ui.access import ctx, tenant_of, who
from tunelab.ui.shell import BASE, button, field, ui_page

router = APIRouter()
ROWS_SCANNED = 5000  # the newest log rows the adapter list is read from


def _scope(t: Tenant) -> str | None:
    return None if t.admin else t.name


def _question(prompt: str | None) -> str:
    """The last user turn of a logged prompt (JSON messages), else the prompt as it is."""
    try:
        return next((m["content"] for m in reversed(json.loads(prompt or "")) if m.get("role") == "user"), prompt)
    except (ValueError, TypeError, AttributeError, KeyError):
        return prompt or ""


def adapters_logged(log, t: Tenant) -> list[str]:
    """The adapters (aliases for versions NAME@vN) whose answers with content the tenant may review."""
    names = {(r.adapter or r.model).split("@")[0] for r in log.rows(tenant=_scope(t), limit=ROWS_SCANNED)
             if r.answer is not None and r.adapter}
    return sorted(n for n in names if t.may_use(n))


def _item(item: rv.ReviewItem, adapter: str) -> str:
    r = item.row
    radios = "".join(f'<label><input type="radio" name="verdict" value="{v}"{" checked" if v == "accept" else ""}>'
                     f" {v} ({v[0]})</label> " for v in rv.VERDICTS)
    rubric = "".join(f'<label><input type="checkbox" name="rubric-{i}" value="1" checked> {esc(req)}</label> '
                     for i, req in enumerate(rv.DEFAULT_RUBRIC))
    return (f'<form class="box review" method="post" action="{BASE}/review/{esc(r.response_id)}">'
            f'<input type="hidden" name="adapter" value="{esc(adapter)}">'
            f"<p><b>{esc(r.adapter or r.model)}</b> · {esc(r.response_id)} · why: {esc(', '.join(item.reasons))}"
            f"{' · flags ' + esc(', '.join(r.flags)) if r.flags else ''}</p>"
            + table(["question", "answer"], [[text_cell(_question(r.prompt)), text_cell(r.answer or "")]], fixed=True)
            + f"<fieldset><legend>Verdict (keys a / c / r)</legend>{radios}</fieldset>"
            + f"<fieldset><legend>Rubric: requirements the answer meets</legend>{rubric}</fieldset>"
            + field("Correction (the right answer, for 'correct')", f"correction-{r.response_id}", "textarea",
                    r.answer or "")
            + field("Comment", f"comment-{r.response_id}", value="")
            + button("Save review") + "</form>")


def _summary(log, adapter: str, t: Tenant) -> str:
    s = rv.summary(rv.reviews(log, adapter, tenant=_scope(t)))
    verdicts = ", ".join(f"{n} {v}" for v, n in s["verdicts"].items())
    rows = [[td(req, ""), td(f"{x['pass']} of {x['n']}")] for req, x in s["rubric"].items()]
    return (f"<p>{s['reviewed']} reviewed ({esc(verdicts)}).</p>"
            + (table(["rubric requirement", "met"], rows) if rows else ""))


@router.get("/review", response_class=HTMLResponse)
def review_page(request: Request, adapter: str = "", t: Tenant = Depends(tenant_of)):
    log = ctx(request).requests()
    names = adapters_logged(log, t)
    adapter = adapter if adapter in names else (names[0] if names else "")
    if not adapter:
        return ui_page("Review", "review", who(t), ['<p class="note">Nothing to review: the log holds no adapter '
                                                    "answers with content (keys.yaml `log: content`).</p>"])
    queue = rv.build_queue(log, adapter, tenant=_scope(t), size=20)
    pick = (f'<form class="box" method="get" action="{BASE}/review"><div class="row">'
            + field("Adapter", "adapter", "select", adapter, options=[(n, n) for n in names])
            + button("Show its queue") + "</div></form>")
    body = [pick, _summary(log, adapter, t), f"<h2>Queue: {len(queue)} answers</h2>"]
    body += [_item(item, adapter) for item in queue] or ['<p class="note">Every answer is reviewed.</p>']
    return ui_page("Review", "review", who(t), body)


@router.post("/review/{response_id}")
async def review_save(response_id: str, request: Request, t: Tenant = Depends(tenant_of)):
    form = await request.form()
    verdict = form.get("verdict") or ""
    review = rv.Review(verdict, correction=form.get(f"correction-{response_id}") if verdict == "correct" else None,
                       rubric={req: bool(form.get(f"rubric-{i}")) for i, req in enumerate(rv.DEFAULT_RUBRIC)},
                       comment=form.get(f"comment-{response_id}") or None, reviewer=f"ui:{t.name}")
    try:
        rv.save_review(ctx(request).requests(), response_id, review, tenant=_scope(t))
    except TunelabError as e:  # another tenant's response reads as no response at all
        raise HTTPException(404 if "no logged response" in str(e) else 400, str(e)) from None
    return RedirectResponse(f"{BASE}/review?adapter={form.get('adapter') or ''}", status_code=303)
