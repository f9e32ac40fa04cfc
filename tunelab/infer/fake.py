"""FakeEngine: the Engine protocol without a model, for tests of what sits on top of an engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tunelab.errors import TunelabError
from tunelab.infer.api import Completion, Request, chat_prompt, cut_at_stop


class FakeEngine:
    """Answers each request with `respond(request)` (default: echo the last user message), word by word."""

    def __init__(self, respond: Callable[[Request], str] | None = None, tokenizer=None):
        self.respond = respond or (lambda q: q.prompt if isinstance(q.prompt, str) else q.prompt[-1]["content"])
        self.tokenizer, self.device, self._adapters = tokenizer, "cpu", []
        self.requests: list[Request] = []  # every request seen, for assertions

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def add_adapter(self, name: str, path: str) -> None:
        if name in self._adapters:
            raise TunelabError(f"an adapter named {name!r} is already loaded; remove it first.")
        self._adapters.append(name)

    def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise TunelabError(f"no adapter named {name!r} is loaded.")
        self._adapters.remove(name)

    def _one(self, q: Request) -> Completion:
        if q.adapter is not None and q.adapter not in self._adapters:
            raise TunelabError(f"no adapter named {q.adapter!r} is loaded.")
        self.requests.append(q)
        words = self.respond(q).split(" ")
        text = " ".join(words[:q.max_new_tokens])
        text, stopped = cut_at_stop(text, q.stop)
        reason = "stop" if stopped or len(words) <= q.max_new_tokens else "length"
        return Completion(q.id, text, list(range(len(text.split()))), reason, self._prompt_tokens(q))

    def _prompt_tokens(self, q: Request) -> int:
        """Prompt length: tokens of the chat prompt with a tokenizer, else whitespace-separated words."""
        if self.tokenizer is not None:
            return len(self.tokenizer(chat_prompt(self.tokenizer, q.prompt), add_special_tokens=False)["input_ids"])
        text = q.prompt if isinstance(q.prompt, str) else " ".join(m["content"] for m in q.prompt)
        return len(text.split())

    def generate(self, requests: list[Request], progress=None) -> list[Completion]:
        out = [self._one(q) for q in requests]
        if progress is not None:
            progress(len(out))
        return out

    def stream(self, request: Request) -> Iterator[str]:
        text = self._one(request).text
        for i, w in enumerate(text.split(" ")):
            yield w if i == 0 else " " + w
