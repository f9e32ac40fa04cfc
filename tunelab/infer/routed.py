"""The routed engine: one engine to the user, llama.cpp's single-stream speed when a request runs alone and
token-level batching as soon as there are more.

A server or the playground mostly runs one request at a time, where the batched engine spends most of a
step on torch's per-op overhead and llama.cpp does not (tunelab.infer.llamacpp). This engine owns both over
the same loaded model (llama.cpp maps a GGUF of its weights, written once): a request that arrives while
nothing else is in flight runs on llama.cpp to its end; a request that arrives meanwhile goes to the batched
engine, and each `step` runs one llama.cpp step and one batched step, so neither side starves the other. Both
pick tokens alike (engine.Picker: the same grammars, seeds, stop strings), so the outputs are the batched
engine's within bf16/f16 rounding (fp32: equal).

No request waits for a GGUF: the base's llama.cpp model, and an adapter's merged one once a lone request asks
for it, are prepared on a worker thread (which also drops the models of removed adapters); until one is
ready its requests run batched. The worker makes every change to the llama.cpp engine's models and adapters,
the engine thread only reads them, and the worker exits when it runs out of work (a thread running torch ops
keeps an OpenMP pool of its own, which slows the engine thread's: see tunelab.server.scheduler).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.infer.api import Request, RequestHandle, StepEngine, prompt_ids
from tunelab.infer.engine import BatchEngine
from tunelab.infer.llamacpp import LlamaCppEngine

BASE = None  # the base model's name among the models the worker prepares


class RoutedEngine(StepEngine):
    """A BatchEngine and a LlamaCppEngine over one model: alone, a request runs on llama.cpp, else batched."""

    def __init__(self, model, tokenizer, folder: str | Path, device: str = "cpu", max_batch: int = 64,
                 threads: int | None = None):
        """folder: the model's local folder (the GGUF takes its tokenizer files); threads: llama.cpp's (torch's
        by default). The base's llama.cpp model is prepared on the worker thread from now on."""
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.batched = BatchEngine(model, tokenizer, device, max_batch=max_batch)  # wraps the model's layers
        self.single = LlamaCppEngine(model, tokenizer, folder, threads, load_base=False)
        self.vocab_size = self.batched.vocab_size
        self.served: Counter[str] = Counter()  # requests run by each engine: "llamacpp", "batched"
        self.failed: dict[str | None, str] = {}  # models whose preparation failed (they run batched): why
        # adapters loaded (the batched engine's): name -> (folder, load number: a reload is another adapter)
        self._paths: dict[str, tuple[str, int]] = {}
        self._loads = itertools.count()
        self._registered: dict[str, tuple[str, int]] = {}  # adapters on llama.cpp's side (the worker writes it)
        self._prepared: set[str | None] = set()  # models the worker made ready (written by the worker only)
        self._lone: RequestHandle | None = None  # the request on llama.cpp (at most one: it ran alone)
        self._jobs: deque[str | None] = deque()  # models to prepare; an adapter no longer loaded: drop it
        self._lock = threading.Lock()  # guards _jobs and _worker
        self._worker: threading.Thread | None = None
        self._queue(BASE)

    # adapters -------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return self.batched.adapters

    def add_adapter(self, name: str, path: str, slot: int | None = None) -> None:
        """Load the adapter on the batched engine now (in `slot`, the adapter manager's choice); its llama.cpp
        model (a merged GGUF) is prepared once a lone request asks for it."""
        self.batched.add_adapter(name, path, slot)
        self._paths[name] = (str(path), next(self._loads))

    def remove_adapter(self, name: str) -> None:
        """Remove the adapter (TunelabError while requests in flight use it); the worker drops its llama.cpp
        model."""
        lone = self._lone
        if lone is not None and not lone.finished and lone.request.adapter == name:
            raise TunelabError(f"adapter {name!r} is in use by requests in flight; remove it when they finish.")
        self.batched.remove_adapter(name)
        del self._paths[name]
        self.failed.pop(name, None)
        self._queue(name)  # the worker drops its llama.cpp model, if it made one

    def compile_grammar(self, schema=None, regex: str | None = None, ebnf: str | None = None):
        """A grammar for SamplingParams.grammar; both engines run it (one tokenizer, one logits width)."""
        return self.batched.compile_grammar(schema, regex, ebnf)

    # requests -------------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> RequestHandle:
        """Run `req` on llama.cpp when nothing else is in flight and its model is ready, else batched (an unready
        model is queued for preparation meanwhile)."""
        if req.adapter is not None and req.adapter not in self._paths:
            return self.batched.add_request(req)  # its error names the adapters loaded
        if not self.has_unfinished() and self._fits(req):
            if self.ready(req.adapter):
                self._lone = self.single.add_request(req)
                self.served["llamacpp"] += 1
                return self._lone
            if req.adapter not in self.failed:
                self._queue(req.adapter)
        self.served["batched"] += 1
        return self.batched.add_request(req)

    def step(self) -> list[RequestHandle]:
        """One llama.cpp step for the lone request and one batched step; returns the requests that finished."""
        done = []
        if self._lone is not None:
            done = self.single.step()
            if self._lone.finished:
                self._lone = None
        if self.batched.has_unfinished():
            done += self.batched.step()
        return done

    def abort(self, handle: RequestHandle) -> None:
        if handle is self._lone:
            self.single.abort(handle)
            self._lone = None
        else:
            self.batched.abort(handle)

    def has_unfinished(self) -> bool:
        return self._lone is not None or self.batched.has_unfinished()

    def _fits(self, req: Request) -> bool:
        """Within llama.cpp's context (its KV cache is allocated whole); a longer request runs batched."""
        return len(prompt_ids(self.tokenizer, req)) + req.params.max_new_tokens <= self.single.context

    # llama.cpp models -----------------------------------------------------------------------------------
    def ready(self, adapter: str | None) -> bool:
        """Whether a lone request for the base (None) or `adapter` would run on llama.cpp now."""
        if adapter not in self._prepared or not self.single.ready(adapter):
            return False
        return adapter is BASE or self._registered.get(adapter) == self._paths.get(adapter)

    def wait_prepared(self, timeout: float | None = None) -> bool:
        """Block until the worker has prepared every model asked for (benches and tests; a server never waits).
        Returns False when `timeout` seconds passed first."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                worker = self._worker
            if worker is None:
                return True
            worker.join(None if end is None else max(0.0, end - time.monotonic()))
            if worker.is_alive():
                return False

    def _queue(self, name: str | None) -> None:
        with self._lock:
            if name not in self._jobs:
                self._jobs.append(name)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="tunelab-gguf", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        """The worker thread: prepare the models queued, one at a time, then exit."""
        while True:
            with self._lock:
                if not self._jobs:
                    self._worker = None
                    return
                name = self._jobs.popleft()
            try:
                self._prepare(name)
            except Exception as e:  # noqa: BLE001 - its requests run batched; the reason is kept in `failed`
                self.failed[name] = f"{type(e).__name__}: {e}"

    def _prepare(self, name: str | None) -> None:
        """Drop the llama.cpp adapters no longer loaded (or loaded from another folder since), then make `name`'s
        model ready: the base's, or the adapter's merged into the base."""
        for old, path in list(self._registered.items()):
            if self._paths.get(old) != path:  # never the lone request's: remove_adapter refuses while it runs
                self._prepared.discard(old)
                del self._registered[old]
                self.single.remove_adapter(old)
        if name is not BASE:
            loaded = self._paths.get(name)
            if loaded is None:
                return  # removed since it was queued
            if name not in self._registered:
                self.single.add_adapter(name, loaded[0])
                self._registered[name] = loaded
        self.single.prepare(name)
        self._prepared.add(name)

    def close(self) -> None:
        """Wait for the worker, then free the llama.cpp models."""
        with self._lock:
            self._jobs.clear()
        self.wait_prepared()
        self.single.close()
