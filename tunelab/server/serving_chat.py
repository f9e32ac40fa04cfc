"""/v1/chat/completions and /v1/completions: request checks, generation through the scheduler, answers and
streams in OpenAI's shape, usage and latency metrics (vLLM: OpenAIServingChat / OpenAIServingCompletion).

Generation goes through the Scheduler (one engine thread, token-level batching with per-row adapters and
grammars), so requests for different adapters share decoding steps.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import tunelab.server.schemas as S
from tunelab.errors import TunelabError
from tunelab.infer import Request, SamplingParams
from tunelab.infer.adapters import AdapterManager
from tunelab.infer.api import chat_prompt
from tunelab.ops.checks import BLOCKED, CheckResult, JudgeSpec, check_answers, prompt_text
from tunelab.ops.rollout import sticky_key
from tunelab.server.auth import OPEN, Tenant
from tunelab.server.metrics import Metrics
from tunelab.server.scheduler import Overloaded, Scheduler
from tunelab.server.schemas import ApiError, too_many
from tunelab.server.serving_logs import Exchange, ServingLogs
from tunelab.server.serving_models import ServingModels

FINISH = {"stop": "stop", "length": "length", "length_closed": "length"}


class ServingChat:
    def __init__(self, engine, scheduler: Scheduler, models: ServingModels, adapters: AdapterManager,
                 metrics: Metrics, default_max_tokens: int = 256, indexes: dict | None = None,
                 logs: ServingLogs | None = None):
        """indexes: name -> retrieval index (RagIndex) a request may name in `rag_index`. logs: the request log
        each request leaves its row in (tunelab.server.serving_logs)."""
        self.engine, self.scheduler, self.models, self.adapters = engine, scheduler, models, adapters
        self.logs = logs or ServingLogs()
        self.metrics, self.default_max_tokens, self.indexes = metrics, default_max_tokens, indexes or {}
        self._grammars: OrderedDict[str, object] = OrderedDict()
        cfg = getattr(getattr(engine, "model", None), "config", None)
        self.context = getattr(cfg, "max_position_embeddings", None) or 8192

    def _grammar(self, fmt: S.ResponseFormat | None):
        if fmt is None or fmt.type == "text":
            return None
        schema = {"type": "object"}
        if fmt.type == "json_schema":
            schema = (fmt.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON Schema object",
                               param="response_format")
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            try:
                self._grammars[key] = self.engine.compile_grammar(schema=schema)
            except TunelabError as e:
                raise ApiError(400, str(e), param="response_format") from None
            while len(self._grammars) > 64:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(key)
        return self._grammars[key]

    def _requests(self, prompt, body: S._Sampling, max_tokens: int | None, adapter, grammar) -> list[Request]:
        tok = self.engine.tokenizer
        ids = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        n_prompt = len(ids)
        room = self.context - n_prompt
        max_new = max_tokens or min(self.default_max_tokens, max(room, 0))
        if n_prompt + max(max_new, 1) > self.context:  # no room for one token is too long as well
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {n_prompt + max_new} tokens ({n_prompt} in the messages, {max_new} "
                                "in the completion). Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        return [Request(prompt, adapter=adapter, prompt_ids=list(ids), params=SamplingParams(
            max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p, stop=tuple(body.stops()),
            seed=None if body.seed is None else body.seed + i, grammar=grammar)) for i in range(body.n)]

    def _submit(self, reqs: list[Request]):
        """Hand `reqs` to the scheduler (inside `adapter_for`); each holds its adapter until it leaves the engine."""
        loop, handles = asyncio.get_running_loop(), []
        try:
            for r in reqs:
                if r.adapter is not None and not self.adapters.try_acquire(r.adapter):  # adapter_for holds it
                    raise RuntimeError(f"adapter {r.adapter!r} submitted outside adapter_for")
                try:
                    handles.append(self.scheduler.submit(r, loop, on_end=lambda a=r.adapter: self.adapters.release(a)))
                except Overloaded:
                    self.adapters.release(r.adapter)
                    raise
            return handles
        except Overloaded as e:
            for h in handles:  # none of them runs: the request fails as a whole
                self.scheduler.cancel(h)
            self.metrics.rejected.inc()
            raise too_many(f"The server is overloaded ({e}); retry later.") from None

    async def chat(self, tenant: Tenant, body: S.ChatCompletionRequest, authorization: str | None = None):
        """authorization: the request's header; with `user`, it picks the version of an alias (sticky)."""
        t0, ex = time.perf_counter(), self.logs.begin(tenant, body, "chat")
        async with self.models.adapter_for(tenant, body.model, sticky_key(authorization, body.user)) as adapter:
            grammar = self._grammar(body.response_format)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            ex.adapter, ex.prompt = adapter, messages
            if body.rag_index is not None:
                messages = self._retrieve(messages, body.rag_index, body.rag_k)
            reqs = self._requests(messages, body, body.max_completion_tokens or body.max_tokens, adapter, grammar)
            handles = self._submit(reqs)
        return await self._run("chat", handles, body, t0, ex)

    def _retrieve(self, messages: list[dict], name: str, k: int) -> list[dict]:
        """The passages index `name` finds for the last user turn, put in by tunelab.rag's template."""
        from tunelab.rag import with_passages

        if name not in self.indexes:
            raise ApiError(404, f"no retrieval index named {name!r}; this server has: "
                                f"{', '.join(self.indexes) or 'none (start it with --rag-index NAME=DIR)'}",
                           param="rag_index")
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return with_passages(messages, self.indexes[name].search(query, k))

    async def complete(self, tenant: Tenant, body: S.CompletionRequest, authorization: str | None = None):
        t0, ex = time.perf_counter(), self.logs.begin(tenant, body, "text")
        async with self.models.adapter_for(tenant, body.model, sticky_key(authorization, body.user)) as adapter:
            ex.adapter, ex.prompt = adapter, body.prompt
            handles = self._submit(self._requests(body.prompt, body, body.max_tokens, adapter, None))
        return await self._run("text", handles, body, t0, ex)

    async def _run(self, kind: str, handles: list, body: S._Sampling, t0: float, ex: Exchange):
        rid = ex.rid
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return self._stream(kind, rid, ex.adapter or body.model, handles, t0, usage, ex)  # NAME@vN for an alias
        try:
            done = await asyncio.gather(*(self._finish(h) for h in handles))
        except ApiError:
            self.logs.submit(ex, [], error=True)
            raise
        checked = await self._check(ex, [c.text for c in done])  # output checks: flags for the log, blocking
        choices = []
        for i, c in enumerate(done):
            reason = FINISH.get(c.finish_reason, c.finish_reason)
            choices.append(_blocked(kind, i, checked[i]) if checked and checked[i].blocked else
                           {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": reason,
                            "logprobs": None} if kind == "chat" else
                           {"index": i, "text": c.text, "finish_reason": reason, "logprobs": None})
        use = S.usage(done[0].prompt_tokens, sum(len(c.token_ids) for c in done), done[0].cached_tokens)
        self.metrics.observe(done, time.perf_counter() - t0)
        await self.logs.record(ex, done)  # committed (bounded wait) before the answer leaves
        make = S.chat_response if kind == "chat" else S.completion_response
        return make(rid, ex.adapter or body.model, choices, use)  # the version that answered, for an alias

    async def _check(self, ex: Exchange, texts: list[str]) -> list[CheckResult] | None:
        """The tenant's output checks (keys.yaml `checks`, tunelab.ops.checks) on answers; what hit goes to the
        log row (ex.flags, ex.blocked) and the metrics. None when the tenant has no checks."""
        if not ex.tenant.checks:
            return None
        results = await check_answers(ex.tenant.checks, texts, prompt_text(ex.prompt), self._judge)
        for r in results:
            ex.flags += [f for f in r.flags if f not in ex.flags]
            ex.blocked = ex.blocked or r.blocked
            for c in ex.tenant.checks:
                if c.name in r.flags:
                    self.metrics.check_hits.labels(ex.tenant.name, c.name, c.spec.action).inc()
        return results

    async def _judge(self, spec: JudgeSpec, messages: list[dict]) -> str:
        """A judge check's reply from the served engine (its base, or `spec.adapter`), greedy."""
        async with self.models.adapter_for(OPEN, spec.adapter or self.models.base_name) as adapter:
            handles = self._submit(self._requests(messages, S._Sampling(model="judge", temperature=0.0),
                                                  spec.max_tokens, adapter, None))
        return (await self._finish(handles[0])).text

    async def _finish(self, handle):
        while True:
            kind, value = await handle.events.get()
            if kind == "error":
                raise ApiError(400 if isinstance(value, TunelabError) else 500, str(value),
                               "invalid_request_error" if isinstance(value, TunelabError) else "server_error")
            if kind == "done":
                return value

    async def _stream(self, kind: str, rid: str, model: str, handles, t0: float,
                      include_usage: bool = False, ex: Exchange | None = None) -> AsyncIterator[str]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, h):
            while True:
                ev = await h.events.get()
                await merged.put((i, *ev))
                if ev[0] in ("done", "error"):
                    return

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        left, done = len(handles), []
        hold = ex is not None and any(c.blocks for c in ex.tenant.checks)  # answers leave once checked, whole
        if kind == "chat":
            for i in range(len(handles)):
                yield _sse(S.chat_chunk(rid, model, i, {"role": "assistant", "content": ""}))
        try:
            while left:
                i, ev, value = await merged.get()
                if ev == "delta" and not hold:
                    yield _sse(S.chat_chunk(rid, model, i, {"content": value}) if kind == "chat" else
                               S.completion_response(rid, model, [{"index": i, "text": value, "finish_reason": None,
                                                                   "logprobs": None}], None))
                elif ev == "error":
                    left -= 1
                    yield _sse(S.error_body(str(value), "server_error"))
                elif ev == "done":
                    left -= 1
                    done.append(value)
                    reason = FINISH.get(value.finish_reason, value.finish_reason)
                    checked = await self._check(ex, [value.text]) if ex is not None else None
                    if checked and checked[0].blocked:
                        reason = BLOCKED
                    elif hold and value.text:
                        yield _sse(S.chat_chunk(rid, model, i, {"content": value.text}) if kind == "chat" else
                                   S.completion_response(rid, model, [{"index": i, "text": value.text,
                                                                       "finish_reason": None, "logprobs": None}], None))
                    yield _sse(S.chat_chunk(rid, model, i, {}, reason) if kind == "chat" else
                               S.completion_response(rid, model, [{"index": i, "text": "", "finish_reason": reason,
                                                                   "logprobs": None}], None))
            if include_usage and done:
                use = S.usage(done[0].prompt_tokens, sum(len(c.token_ids) for c in done), done[0].cached_tokens)
                last = S.chat_chunk(rid, model, 0, {}) if kind == "chat" else S.completion_response(rid, model, [], None)
                yield _sse({**last, "choices": [], "usage": use})
            if ex is not None:
                await self.logs.record(ex, done, error=len(done) < len(handles))
            yield "data: [DONE]\n\n"
        finally:  # also when the client closed the stream early (the generator is cancelled or closed)
            for t in tasks:
                t.cancel()
            if len(done) < len(handles):
                for h in handles:
                    self.scheduler.cancel(h)
            if done:
                self.metrics.observe(done, time.perf_counter() - t0)
            if ex is not None:  # the client left before the end: the row says so (an error), unwaited
                self.logs.submit(ex, done, error=True)


def _blocked(kind: str, i: int, result: CheckResult) -> dict:
    """A choice an output check blocked, as OpenAI's content filter returns one: finish_reason "content_filter"
    and no content (chat: the message's `refusal` says which check)."""
    if kind == "chat":
        return {"index": i, "message": {"role": "assistant", "content": None, "refusal": result.message()},
                "finish_reason": BLOCKED, "logprobs": None}
    return {"index": i, "text": "", "finish_reason": BLOCKED, "logprobs": None}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
