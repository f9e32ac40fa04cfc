"""The engine contract: Request and SamplingParams in, a RequestHandle per request, Completion out.

Every engine implements the step-wise protocol (vLLM's `LLMEngine`): `add_request(request) -> handle`,
`step() -> handles finished`, `abort(handle)`, `has_unfinished()`; `generate` and `stream` run on top of
them (`StepEngine`), so a streamed answer is the batched one piece by piece.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from tunelab.errors import TunelabError
from tunelab.models.overrides import require_chat_template

_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    """How to generate; every engine reads these and nothing else.

    temperature 0 is greedy; `seed` makes sampling repeatable. stop: strings that end the answer (cut off).
    ignore_eos: generate all max_new_tokens (vLLM's name; benches use it to hold the workload fixed).
    grammar: from `engine.compile_grammar(...)` (every row then ends as a complete document), or None.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    grammar: object | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise TunelabError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}.")
        if self.temperature < 0:
            raise TunelabError(f"temperature must be 0 (greedy) or more, not {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise TunelabError(f"top_p must be in (0, 1], not {self.top_p}.")


@dataclass
class Request:
    """One generation: `prompt` is chat messages (the chat template is applied) or raw text; `adapter` a loaded
    adapter's name (None: the base). prompt_ids: the prompt's tokens when the caller has them already (the
    server counts them): the engine then does not tokenize again (see `prompt_ids`)."""

    prompt: list[dict] | str
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_ids: list[int] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class Completion:
    """A finished request. finish_reason: "stop" (end of sequence, a stop string or a finished grammar),
    "length" (max_new_tokens reached), "length_closed" (a grammar steered to its shortest valid end
    because the budget ran out: valid but cut short) or "cancelled" (aborted)."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    arrival: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    grammar: dict | None = None  # under a grammar, its outcome (structured.GrammarState.report): backend, valid...

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival


class RequestHandle:
    """A request inside an engine, as `add_request` returns it. While it runs, `new_text()` hands out the text
    generated since the last call; once `finished`, `completion()` is the result. Read-only for callers:
    request, token_ids, finish_reason, cached_tokens and the timings belong to the engine."""

    def __init__(self, request: Request, prompt_ids: list[int], decode: Callable[[list[int]], str],
                 arrival: float):
        self.request, self.params, self.prompt_ids = request, request.params, prompt_ids
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.arrival, self.first_token_time, self.finish_time = arrival, None, None
        self._decode = decode
        self._sent = 0  # characters handed out by new_text
        self.grammar = None  # the request's grammar state, where the engine keeps one (its report: completion)

    @property
    def streamed(self) -> bool:
        """Text was handed out already (new_text): the answer can no longer be drawn again."""
        return self._sent > 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def text(self) -> str:
        """The text so far; once finished, cut at the first stop string."""
        text = self._decode(self.token_ids)
        return cut_at_stop(text, self.params.stop)[0] if self.finished else text

    def new_text(self) -> str:
        """The text not handed out yet that is safe to hand out: while the request runs, the last characters
        that could still turn out to start a stop string, or be half a character, are held back."""
        text = self.text()
        if not self.finished:
            stop = self.params.stop
            text = cut_at_stop(text, stop)[0]
            text = text[:len(text) - max((len(s) for s in stop), default=1) + 1]  # a stop string may follow
            if text.endswith("\ufffd"):  # half of a multi-byte character
                text = text[:-1]
        if len(text) <= self._sent:
            return ""
        delta, self._sent = text[self._sent:], len(text)
        return delta

    def completion(self) -> Completion:
        return Completion(self.request.id, self.text(), list(self.token_ids), self.finish_reason or "cancelled",
                          len(self.prompt_ids), self.cached_tokens, self.arrival, self.first_token_time,
                          self.finish_time, self.grammar.report() if self.grammar is not None else None)


class Engine(Protocol):
    """A base model with named adapters that generates for requests, step by step."""

    tokenizer: object
    device: str

    @property
    def adapters(self) -> list[str]: ...

    def add_adapter(self, name: str, path: str, slot: int | None = None) -> None:
        """Load a PEFT adapter folder under `name`; `slot`: where an engine that stacks adapters' weights puts
        it (the adapter manager's choice; None: the lowest free one)."""

    def remove_adapter(self, name: str) -> None: ...

    def compile_grammar(self, schema=None, regex: str | None = None, ebnf: str | None = None):
        """A grammar for SamplingParams.grammar, compiled for this engine's tokenizer and logits width."""

    def add_request(self, request: Request) -> RequestHandle:
        """Queue `request` (TunelabError for an unknown adapter or an empty prompt); a later `step` runs it."""

    def step(self) -> list[RequestHandle]:
        """Advance the requests in flight; returns those that finished in this step."""

    def abort(self, handle: RequestHandle) -> None:
        """Drop a request that has not finished (finish_reason "cancelled"); a finished one is left as is."""

    def has_unfinished(self) -> bool: ...

    def generate(self, requests: list[Request], progress=None) -> list[Completion]:
        """All requests to completion, in order; `progress(n_done)` is called as requests finish."""

    def stream(self, request: Request) -> Iterator[str]:
        """Text pieces of one request as they are generated."""


class StepEngine:
    """`generate` and `stream` on top of an engine's add_request / step / abort (the one code path)."""

    def generate(self, requests: list[Request], progress=None) -> list[Completion]:
        handles: list[RequestHandle] = []
        try:
            for q in requests:
                handles.append(self.add_request(q))
            mine, left = {id(h) for h in handles}, len(handles)
            while left:
                done = sum(id(h) in mine for h in self.step())
                left -= done
                if progress is not None and done:
                    progress(len(handles) - left)
        finally:  # an error (or an interrupt) leaves nothing of these requests behind in the engine
            for h in handles:
                if not h.finished:
                    self.abort(h)
        return [h.completion() for h in handles]

    def stream(self, request: Request) -> Iterator[str]:
        handle = self.add_request(request)
        try:
            while not handle.finished:
                self.step()
                delta = handle.new_text()
                if delta:
                    yield delta
        finally:  # the consumer stopped early: the request leaves the engine
            if not handle.finished:
                self.abort(handle)


def prompt_ids(tokenizer, request: Request) -> list[int]:
    """The request's prompt tokens: `request.prompt_ids` when the caller set them, else tokenized (chat template
    applied) and kept there, so a request is tokenized once."""
    if request.prompt_ids is None:
        request.prompt_ids = tokenizer(chat_prompt(tokenizer, request.prompt), add_special_tokens=False)["input_ids"]
    if not request.prompt_ids:
        raise TunelabError(f"request {request.id}: the prompt is empty.")
    return request.prompt_ids


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a sequence: the tokenizer's and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    e = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(e if isinstance(e, list) else [e])
    return {i for i in ids if i is not None}


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut], cut != len(text)


def chat_prompt(tokenizer, prompt: list[dict] | str) -> str:
    if isinstance(prompt, str):
        return prompt
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
