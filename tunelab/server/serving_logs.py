"""The request log's side of the server: the row each request leaves (tunelab.ops.requestlog: GenAI fields,
tenant, adapter, version, outcome; prompt and answer only for tenants whose keys.yaml says `log: content`,
redacted), GET /v1/logs (a tenant reads its own rows) and POST /v1/feedback (on its own responses).

Rows go through a LogWriter (a thread of its own, batches); a handler waits, bounded, until its row is
committed before it answers, so every answered request's row survives the server being killed. While the store
is failing nobody waits: the rows are dropped and counted, and the requests succeed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field

import tunelab.server.schemas as S
from tunelab.errors import TunelabError
from tunelab.ops.logwriter import LogWriter
from tunelab.ops.prompts import prompt_version
from tunelab.ops.redact import redactor
from tunelab.ops.requestlog import LogRow, RequestLog, attributes, evaluation
from tunelab.server.auth import Tenant
from tunelab.server.schemas import ApiError


@dataclass
class Exchange:
    """One request as the log sees it, filled in while it runs. Output checks (tunelab.ops.checks) set `flags`
    and `blocked` before the answer is returned; `resampled` says an answer was drawn again (as does a grammar's
    report in Completion.grammar)."""

    rid: str  # the response's id, "chatcmpl-..." or "cmpl-..."
    tenant: Tenant
    body: S._Sampling
    t0: float  # time.perf_counter() at the start
    ts: float  # time.time() at the start
    adapter: str | None = None  # what the serving path resolved `body.model` to (None: the base)
    prompt: object = None  # the client's messages (chat) or prompt (completions)
    flags: list[str] = field(default_factory=list)
    blocked: bool = False
    resampled: bool = False
    recorded: bool = False


class ServingLogs:
    def __init__(self, writer: LogWriter | None = None, wait_s: float = 2.0):
        """writer: where rows go (None: the server keeps no log). wait_s: how long a handler waits at most for
        its row to be committed before it answers anyway."""
        self.writer, self.wait_s = writer, wait_s
        self.store: RequestLog | None = writer.store if writer else None

    def begin(self, tenant: Tenant, body: S._Sampling, kind: str) -> Exchange:
        return Exchange(S.new_id("chatcmpl" if kind == "chat" else "cmpl"), tenant, body, time.perf_counter(),
                        time.time())

    async def record(self, ex: Exchange, done: list, error: bool = False) -> None:
        """Queue the row of `ex` (its completions `done`) and wait, bounded, until it is committed."""
        fut = self.submit(ex, done, error)
        if fut is None or self.writer.failing:
            return
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.wait_s)
        except asyncio.TimeoutError:
            pass  # the row is still queued; the answer does not wait longer

    def submit(self, ex: Exchange, done: list, error: bool = False):
        """Queue the row without waiting (a stream the client closed); the writer's Future, or None."""
        if self.writer is None or ex.recorded:
            return None
        ex.recorded = True
        return self.writer.submit(self.row(ex, done, error))

    def row(self, ex: Exchange, done: list, error: bool = False) -> LogRow:
        b, first = ex.body, done[0] if done else None
        reasons = [c.finish_reason for c in done]
        resampled = ex.resampled or any((getattr(c, "grammar", None) or {}).get("resampled") for c in done)
        outcome = ("blocked" if ex.blocked else "error" if error or not done or "cancelled" in reasons else
                   "resampled" if resampled else "length_closed" if "length_closed" in reasons else "ok")
        row = LogRow(ex.rid, ex.ts, ex.tenant.name, b.model, ex.adapter, _version(b.model, ex.adapter),
                     b.temperature, getattr(b, "max_completion_tokens", None) or b.max_tokens, b.top_p, b.seed,
                     first.prompt_tokens if first else 0, sum(len(c.token_ids) for c in done),
                     ("length" if reasons[0] == "length_closed" else reasons[0]) if done else "error", outcome,
                     time.perf_counter() - ex.t0, None, _grammar(getattr(b, "response_format", None)),
                     list(ex.flags), hashlib.sha256(b.user.encode()).hexdigest() if b.user else None)
        row.prompt_version = _prompt_version(ex.prompt)
        if first is not None and first.first_token_time is not None:
            row.ttft_s = max(0.0, first.first_token_time - ex.t0)
        if ex.tenant.log == "content":
            redact = redactor(ex.tenant.redact)
            prompt = ex.prompt if isinstance(ex.prompt, str) else json.dumps(ex.prompt, ensure_ascii=False)
            texts = [c.text for c in done]
            row.prompt = redact(prompt) if ex.prompt is not None else None
            row.answer = redact(texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False))
        return row

    def _store(self) -> RequestLog:
        if self.store is None:
            raise ApiError(404, "this server keeps no request log (it was started with --log off)")
        return self.store

    def list(self, tenant: Tenant, *, model: str | None = None, adapter: str | None = None,
             since: float | None = None, until: float | None = None, limit: int = 100,
             of_tenant: str | None = None) -> dict:
        """GET /v1/logs: the tenant's own rows, newest `limit`, oldest first, as GenAI attributes; an admin
        reads every tenant's (or `of_tenant`'s)."""
        who = (of_tenant if tenant.admin else tenant.name)
        rows = self._call(lambda s: s.rows(tenant=who, model=model, adapter=adapter, since=since, until=until,
                                           limit=max(1, min(limit, 1000))))
        return {"object": "list", "data": [attributes(r) for r in rows]}

    def feedback(self, tenant: Tenant, body: S.FeedbackRequest) -> dict:
        """POST /v1/feedback: stored only for one of the tenant's own responses (any, for an admin); others
        are a 404, the same as a response that does not exist."""
        if body.score is None and body.label is None:
            raise ApiError(400, "feedback needs a score or a label (or both)", param="score")
        ok = self._call(lambda s: s.add_feedback(body.response_id, None if tenant.admin else tenant.name,
                                                 score=body.score, label=body.label, comment=body.comment,
                                                 correction=body.correction, name=body.name))
        if not ok:
            raise ApiError(404, f"no response {body.response_id!r} of yours in the request log",
                           param="response_id", code="response_not_found")
        fb = {"response_id": body.response_id, "tenant": tenant.name, "name": body.name, "score": body.score,
              "label": body.label, "explanation": body.comment, "correction": body.correction}
        return {"object": "feedback", "event": "gen_ai.evaluation.result", "attributes": evaluation(fb)}

    def _call(self, fn):
        store = self._store()
        try:
            return fn(store)
        except TunelabError as e:
            raise ApiError(503, f"the request log is unavailable ({e})", "server_error") from None
        except Exception as e:  # noqa: BLE001 - a store error (sqlite3 / psycopg) is the log's, not the caller's
            raise ApiError(503, f"the request log is unavailable ({type(e).__name__}: {e})", "server_error") \
                from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer.store.close()


def _version(model: str, adapter: str | None) -> str | None:
    """"v2" when `model` named an alias that resolved to adapter NAME@v2, else None."""
    if adapter and "@" in adapter and "@" not in model:
        return adapter.rpartition("@")[2]
    return None


def _prompt_version(prompt) -> str | None:
    """The version (tunelab.ops.prompts) of the system prompt a chat request ran with: its first system message
    (an alias's registered system prompt, when the client sent that text, has the same version); None without one."""
    if not isinstance(prompt, list):
        return None
    text = next((m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "system"), None)
    return prompt_version(text) if isinstance(text, str) and text.strip() else None


def _grammar(fmt) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "json_object"
    schema = json.dumps((fmt.json_schema or {}).get("schema"), sort_keys=True)
    return "json_schema:" + hashlib.sha256(schema.encode()).hexdigest()[:12]
