"""Test doubles and bench peers (not used by the product): FakeEngine, the engine contract without a model;
MaskOnly, xgrammar's mask alone as the peer of the always-finishing grammar state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.infer.api import Request, RequestHandle, StepEngine, cut_at_stop, prompt_ids
from tunelab.infer.grammar import compile_grammar
from tunelab.infer.structured import GrammarState


class FakeEngine(StepEngine):
    """Answers each request with `respond(request)` (default: echo the last user message), one word per step.

    A token is a word here: token_ids are word positions, max_new_tokens counts words. Stop strings, abort and
    adapters behave as in the real engines; grammars are compiled (with a tokenizer) but not applied."""

    def __init__(self, respond: Callable[[Request], str] | None = None, tokenizer=None):
        self.respond = respond or (lambda q: q.prompt if isinstance(q.prompt, str) else q.prompt[-1]["content"])
        self.tokenizer, self.device, self._adapters = tokenizer, "cpu", []
        self.requests: list[Request] = []  # every request seen, for assertions
        self._live: list[_Answer] = []

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def add_adapter(self, name: str, path: str, slot: int | None = None) -> None:
        if name in self._adapters:
            raise TunelabError(f"an adapter named {name!r} is already loaded; remove it first.")
        self._adapters.append(name)

    def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise TunelabError(f"no adapter named {name!r} is loaded.")
        if any(h.request.adapter == name for h in self._live):
            raise TunelabError(f"adapter {name!r} is in use by requests in flight; remove it when they finish.")
        self._adapters.remove(name)

    def compile_grammar(self, schema=None, regex: str | None = None, ebnf: str | None = None):
        if self.tokenizer is None:
            raise TunelabError("this FakeEngine has no tokenizer to compile a grammar for: FakeEngine(tokenizer=...).")
        return compile_grammar(self.tokenizer, schema, regex, ebnf)

    def add_request(self, request: Request) -> RequestHandle:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise TunelabError(f"no adapter named {request.adapter!r} is loaded.")
        self.requests.append(request)
        words = self.respond(request).split(" ")
        h = _Answer(request, self._prompt_ids(request), lambda ids: " ".join(words[i] for i in ids),
                    time.perf_counter())
        h.words = len(words)
        self._live.append(h)
        return h

    def _prompt_ids(self, q: Request) -> list[int]:
        """The prompt's tokens with a tokenizer, else one per whitespace-separated word."""
        if self.tokenizer is not None or q.prompt_ids is not None:
            return prompt_ids(self.tokenizer, q)
        text = q.prompt if isinstance(q.prompt, str) else " ".join(m["content"] for m in q.prompt)
        return list(range(len(text.split())))

    def step(self) -> list[RequestHandle]:
        now, done = time.perf_counter(), []
        for h in self._live:
            h.token_ids.append(len(h.token_ids))
            h.first_token_time = h.first_token_time or now
            p = h.params
            if (p.stop and cut_at_stop(h.text(), p.stop)[1]) or len(h.token_ids) == h.words:
                h.finish_reason = "stop"
            elif len(h.token_ids) >= p.max_new_tokens:
                h.finish_reason = "length"
            if h.finished:
                h.finish_time = now
                done.append(h)
        self._live = [h for h in self._live if not h.finished]
        return done

    def abort(self, handle: RequestHandle) -> None:
        if not handle.finished:
            handle.finish_reason = "cancelled"
            self._live.remove(handle)

    def has_unfinished(self) -> bool:
        return bool(self._live)


class _Answer(RequestHandle):
    words = 0  # words in the whole answer


class PlainGrammarState:
    """xgrammar's matcher alone: valid so far, never steered to a close (the peer the benches compare with:
    a grammar wrapped in `MaskOnly`)."""

    def __init__(self, compiled, max_new_tokens: int, slack: int = 0):
        self._inner = GrammarState(compiled, max_new_tokens)
        self.closer_seconds = 0.0

    def forced_token(self, remaining: int) -> None:
        return None

    def vet(self, token_id: int, remaining: int) -> int:
        return token_id

    def __getattr__(self, name):  # fill_mask, accept, is_terminated, finish_reason, closed_early
        return getattr(self._inner, name)


@dataclass(frozen=True)
class MaskOnly:
    """A compiled grammar applied as xgrammar's mask alone (SamplingParams(grammar=MaskOnly(g))): valid so far,
    never steered to a close, so it may be cut unfinished. The benches' peer for GrammarState's cost."""

    compiled: object

    def new_state(self, max_new_tokens: int) -> PlainGrammarState:
        return PlainGrammarState(self.compiled, max_new_tokens)
