"""The serving logic behind the HTTP routes: auth, model names, request checks, generation, usage, metrics.

Built once per server and kept on the app (`app.state.service`); the routes in tunelab.server.app only
translate HTTP to these calls. Generation goes through the Scheduler (one engine thread, token-level batching
with per-row adapters and grammars), so requests for different adapters share decoding steps.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from tunelab.errors import TunelabError
from tunelab.infer import Request, compile_grammar
from tunelab.infer.api import chat_prompt
from tunelab.server import schemas as S
from tunelab.server.metrics import Metrics
from tunelab.server.scheduler import Overloaded, Scheduler
from tunelab.server.tenants import OPEN, AdapterPool, Keys, Tenant

FINISH = {"stop": "stop", "length": "length", "length_closed": "length"}


class ApiError(Exception):
    """An error in OpenAI's shape, with its HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, S.error_body(message, type_, param, code), headers or {}


def _not_found(model: str) -> ApiError:  # the same for a missing adapter and another tenant's
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    "invalid_request_error", "model", "model_not_found")


class ServeService:
    def __init__(self, engine, base_name: str, adapters_root=None, keys: Keys | None = None, capacity: int = 8,
                 pinned: list[str] = (), max_waiting: int = 256, default_max_tokens: int = 256,
                 indexes: dict | None = None, adapter_wait_s: float = 30.0, engine_thread: bool = True):
        """indexes: name -> retrieval index folder (or RagIndex) a request may name in `rag_index`.
        adapter_wait_s: requests for cold adapters wait for resident slots, in order, and get 429s once none of
        them got one for this long (the slots are pinned or held).
        engine_thread: step the engine on a thread of its own; False: the caller runs `self.scheduler.run()`
        (`serve_http` does, on the thread that loaded the model: see tunelab.server.scheduler)."""
        self.engine, self.base_name, self.keys = engine, base_name, keys
        self.adapter_wait_s = adapter_wait_s
        self.indexes = {}
        if indexes:
            from tunelab.rag import RagIndex, load_index

            self.indexes = {n: i if isinstance(i, RagIndex) else load_index(i) for n, i in indexes.items()}
        self.scheduler = Scheduler(engine, max_waiting, thread=engine_thread)
        self.pool = AdapterPool(adapters_root, engine, self.scheduler.call, capacity, pinned)
        self.default_max_tokens = default_max_tokens
        self.metrics = Metrics(self)
        self._grammars: OrderedDict[str, object] = OrderedDict()
        self._cold = None  # (loop, lock, freed): requests waiting for a resident slot, see _acquire_cold
        self._cold_waiting, self._cold_moved = 0, 0.0  # how many wait; when one last got its slot
        cfg = getattr(getattr(engine, "model", None), "config", None)
        self.context = getattr(cfg, "max_position_embeddings", None) or 8192
        self.vocab_size = getattr(cfg, "vocab_size", None)
        for name in pinned:
            self.pool.ensure(name)

    def close(self) -> None:
        self.scheduler.close()

    # who and what -----------------------------------------------------------------------------------------
    def tenant(self, authorization: str | None) -> Tenant:
        if self.keys is None:
            return OPEN
        t = self.keys.tenant(authorization)
        if t is None:
            raise ApiError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
        return t

    @asynccontextmanager
    async def adapter_for(self, tenant: Tenant, model: str):
        """The adapter `model` names (None for the base), resident and kept from eviction until the block ends;
        `_submit` inside it holds it again for each request, until the request leaves the engine. A resident
        adapter is taken on the event loop; a cold one loads on a worker thread, so loading it stalls no other
        request. While every resident slot is pinned or in use, it waits, in arrival order, for a slot to free
        (a request on an adapter no other request uses ends): see `_acquire_cold`."""
        name = None if model == self.base_name else model
        if name is not None and not tenant.may_use(name):
            raise _not_found(model)
        if name is not None and not self.pool.try_acquire(name):
            await self._acquire_cold(name)
        try:
            yield name
        finally:
            self.pool.release(name)

    async def _acquire_cold(self, name: str) -> None:
        """Load `name` once a resident slot frees, in arrival order. A waiter gives up (429) only when no waiting
        request got a slot for `adapter_wait_s`: the slots are pinned, or held by requests that do not end. A
        fixed wait per request failed a steady load over more adapters than slots (64 clients, 64 adapters,
        16 resident: 11 of 384 requests), though the queue moved every few seconds."""
        loop = asyncio.get_running_loop()
        if self._cold is None or self._cold[0] is not loop:  # asyncio primitives belong to one loop
            freed = asyncio.Event()
            self._cold = (loop, asyncio.Lock(), freed)
            self.pool.on_free = partial(_wake, loop, freed)
        _, lock, freed = self._cold
        if self._cold_waiting >= self.scheduler.max_waiting:
            raise ApiError(429, f"{self._cold_waiting} requests wait for a resident adapter slot; retry later",
                           "rate_limit_error", headers={"Retry-After": "1"})
        start = time.monotonic()
        self._cold_waiting += 1
        try:
            async with lock:  # FIFO: the longest waiting request gets the next free slot
                while True:
                    freed.clear()
                    try:
                        await asyncio.to_thread(self._acquire, name)
                        self._cold_moved = time.monotonic()
                        return
                    except ApiError as e:
                        left = max(start, self._cold_moved) + self.adapter_wait_s - time.monotonic()
                        if e.status != 429 or left <= 0:
                            raise
                    try:  # woken by a release; at least every 0.5 s (a pin dropped frees a slot without one)
                        await asyncio.wait_for(freed.wait(), min(left, 0.5))
                    except TimeoutError:
                        pass
        finally:
            self._cold_waiting -= 1

    def _acquire(self, model: str) -> None:
        try:
            self.pool.acquire(model)
        except KeyError:
            raise _not_found(model) from None
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"}) from None
        except TunelabError as e:
            raise ApiError(400, str(e), "invalid_request_error", "model") from None

    def models(self, tenant: Tenant) -> dict:
        names = [n for n in self.pool.available() if tenant.may_use(n)]
        now = int(time.time())
        data = [{"id": self.base_name, "object": "model", "created": now, "owned_by": "tunelab", "root": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": tenant.name, "parent": self.base_name,
                  "resident": n in self.pool.resident} for n in names]
        return {"object": "list", "data": data}

    def load(self, tenant: Tenant, req: S.LoadAdapterRequest) -> str:
        self._admin(tenant)
        try:
            self.pool.acquire(req.lora_name, req.lora_path)
        except KeyError:
            raise ApiError(404, f"no adapter folder {req.lora_path or req.lora_name!r} under the adapters root",
                           param="lora_path") from None
        except TunelabError as e:
            raise ApiError(400, str(e), param="lora_path") from None
        self.pool.pinned.add(req.lora_name)  # loaded by an admin: kept until unloaded
        self.pool.release(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def unload(self, tenant: Tenant, req: S.UnloadAdapterRequest) -> str:
        self._admin(tenant)
        try:
            self.pool.unload(req.lora_name)
        except KeyError:
            raise ApiError(404, f"adapter {req.lora_name!r} is not loaded", param="lora_name") from None
        except TunelabError as e:
            raise ApiError(409, str(e), param="lora_name") from None
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def _admin(self, tenant: Tenant) -> None:
        if not tenant.admin:
            raise ApiError(403, "loading and unloading adapters needs an admin key", "permission_error")

    # generation -------------------------------------------------------------------------------------------
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
                self._grammars[key] = compile_grammar(self.engine.tokenizer, schema=schema,
                                                      vocab_size=self.vocab_size)
            except TunelabError as e:
                raise ApiError(400, str(e), param="response_format") from None
            while len(self._grammars) > 64:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(key)
        return self._grammars[key]

    def _requests(self, prompt, body: S._Sampling, max_tokens: int | None, adapter, grammar) -> list[Request]:
        tok = self.engine.tokenizer
        n_prompt = len(tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"])
        room = self.context - n_prompt
        max_new = max_tokens or min(self.default_max_tokens, max(room, 0))
        if n_prompt + max_new > self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {n_prompt + max_new} tokens ({n_prompt} in the messages, {max_new} "
                                "in the completion). Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        return [Request(prompt, adapter=adapter, grammar=grammar, stop=body.stops(), max_new_tokens=max_new,
                        temperature=body.temperature, top_p=body.top_p,
                        seed=None if body.seed is None else body.seed + i) for i in range(body.n)]

    def _submit(self, reqs: list[Request]):
        """Hand `reqs` to the scheduler (inside `adapter_for`); each holds its adapter until it leaves the engine."""
        loop, handles = asyncio.get_running_loop(), []
        try:
            for r in reqs:
                if r.adapter is not None and not self.pool.try_acquire(r.adapter):  # adapter_for holds it
                    raise RuntimeError(f"adapter {r.adapter!r} submitted outside adapter_for")
                try:
                    handles.append(self.scheduler.submit(r, loop, on_end=lambda a=r.adapter: self.pool.release(a)))
                except Overloaded:
                    self.pool.release(r.adapter)
                    raise
            return handles
        except Overloaded as e:
            for h in handles:  # none of them runs: the request fails as a whole
                self.scheduler.cancel(h)
            self.metrics.rejected.inc()
            raise ApiError(429, f"The server is overloaded ({e}); retry later.", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None

    async def chat(self, tenant: Tenant, body: S.ChatCompletionRequest):
        t0 = time.perf_counter()
        async with self.adapter_for(tenant, body.model) as adapter:
            grammar = self._grammar(body.response_format)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            if body.rag_index is not None:
                messages = self._retrieve(messages, body.rag_index, body.rag_k)
            reqs = self._requests(messages, body, body.max_completion_tokens or body.max_tokens, adapter, grammar)
            handles = self._submit(reqs)
        return await self._run("chat", handles, body, t0)

    def _retrieve(self, messages: list[dict], name: str, k: int) -> list[dict]:
        """The passages index `name` finds for the last user turn, put in by tunelab.rag's template."""
        from tunelab.rag import with_passages

        if name not in self.indexes:
            raise ApiError(404, f"no retrieval index named {name!r}; this server has: "
                                f"{', '.join(self.indexes) or 'none (start it with --rag-index NAME=DIR)'}",
                           param="rag_index")
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return with_passages(messages, self.indexes[name].search(query, k))

    async def complete(self, tenant: Tenant, body: S.CompletionRequest):
        t0 = time.perf_counter()
        async with self.adapter_for(tenant, body.model) as adapter:
            handles = self._submit(self._requests(body.prompt, body, body.max_tokens, adapter, None))
        return await self._run("text", handles, body, t0)

    async def _run(self, kind: str, handles: list, body: S._Sampling, t0: float):
        rid = S.new_id("chatcmpl" if kind == "chat" else "cmpl")
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return self._stream(kind, rid, body.model, handles, t0, usage)
        done = await asyncio.gather(*(self._finish(h) for h in handles))
        choices = []
        for i, c in enumerate(done):
            reason = FINISH.get(c.finish_reason, c.finish_reason)
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": reason,
                            "logprobs": None} if kind == "chat" else
                           {"index": i, "text": c.text, "finish_reason": reason, "logprobs": None})
        use = S.usage(done[0].prompt_tokens, sum(len(c.token_ids) for c in done), done[0].cached_tokens)
        self.metrics.observe(done, time.perf_counter() - t0)
        make = S.chat_response if kind == "chat" else S.completion_response
        return make(rid, body.model, choices, use)

    async def _finish(self, handle):
        while True:
            kind, value = await handle.events.get()
            if kind == "error":
                raise ApiError(400 if isinstance(value, TunelabError) else 500, str(value),
                               "invalid_request_error" if isinstance(value, TunelabError) else "server_error")
            if kind == "done":
                return value

    async def _stream(self, kind: str, rid: str, model: str, handles, t0: float,
                      include_usage: bool = False) -> AsyncIterator[str]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, h):
            while True:
                ev = await h.events.get()
                await merged.put((i, *ev))
                if ev[0] in ("done", "error"):
                    return

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        left, done = len(handles), []
        if kind == "chat":
            for i in range(len(handles)):
                yield _sse(S.chat_chunk(rid, model, i, {"role": "assistant", "content": ""}))
        try:
            while left:
                i, ev, value = await merged.get()
                if ev == "delta":
                    yield _sse(S.chat_chunk(rid, model, i, {"content": value}) if kind == "chat" else
                               S.completion_response(rid, model, [{"index": i, "text": value, "finish_reason": None,
                                                                   "logprobs": None}], None))
                elif ev == "error":
                    left -= 1
                    yield _sse(S.error_body(str(value), "server_error"))
                else:
                    left -= 1
                    done.append(value)
                    reason = FINISH.get(value.finish_reason, value.finish_reason)
                    yield _sse(S.chat_chunk(rid, model, i, {}, reason) if kind == "chat" else
                               S.completion_response(rid, model, [{"index": i, "text": "", "finish_reason": reason,
                                                                   "logprobs": None}], None))
            if include_usage and done:
                use = S.usage(done[0].prompt_tokens, sum(len(c.token_ids) for c in done), done[0].cached_tokens)
                last = S.chat_chunk(rid, model, 0, {}) if kind == "chat" else S.completion_response(rid, model, [], None)
                yield _sse({**last, "choices": [], "usage": use})
            yield "data: [DONE]\n\n"
        finally:  # also when the client closed the stream early (the generator is cancelled or closed)
            for t in tasks:
                t.cancel()
            if len(done) < len(handles):
                for h in handles:
                    self.scheduler.cancel(h)
            if done:
                self.metrics.observe(done, time.perf_counter() - t0)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _wake(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    """Set `event` from any thread (the engine thread releases adapters); nothing once its loop has closed."""
    try:
        loop.call_soon_threadsafe(event.set)
    except RuntimeError:
        pass
