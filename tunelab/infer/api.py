"""What every engine takes and returns: Request, Completion, and the Engine protocol."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from tunelab.models.overrides import require_chat_template

_ids = itertools.count(1)


@dataclass
class Request:
    """One generation. `prompt` is chat messages (the chat template is applied) or raw text.

    adapter: a loaded adapter's name, None for the base. grammar: an xgrammar CompiledGrammar
    (`tunelab.infer.compile_grammar`) or None. temperature 0 is greedy; `seed` makes sampling repeatable.
    ignore_eos: generate all max_new_tokens (vLLM's name; benches use it to hold the workload fixed).
    """

    prompt: list[dict] | str
    adapter: str | None = None
    grammar: object | None = None
    stop: tuple[str, ...] | list[str] = ()
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class Completion:
    """A finished request. finish_reason: "stop" (end of sequence, a stop string or a finished grammar),
    "length" (max_new_tokens reached) or "length_closed" (a grammar steered to its shortest valid end
    because the budget ran out: valid but cut short)."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    arrival: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival


class Engine(Protocol):
    """A base model with named adapters that generates for batches of requests."""

    tokenizer: object
    device: str

    @property
    def adapters(self) -> list[str]: ...

    def add_adapter(self, name: str, path: str) -> None: ...

    def remove_adapter(self, name: str) -> None: ...

    def generate(self, requests: list[Request], progress=None) -> list[Completion]:
        """All requests to completion, in order; `progress(n_done)` is called as rows finish."""

    def stream(self, request: Request) -> Iterator[str]:
        """Text pieces of one request as they are generated."""


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
