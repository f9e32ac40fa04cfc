"""Teachers that answer prompts: a local model (tunelab's engine, optional adapter) or an OpenAI-compatible endpoint.

Both yield one `Answer` per prompt as it is ready, so the caller can write it down at once (resumable runs).
The endpoint teacher retries 429 / 5xx / 408 / 409 / connection errors itself, with exponential backoff and
jitter, waiting what a Retry-After header asks when there is one. The openai SDK can retry too, but quietly:
here the client gets max_retries=0 so every attempt is counted (recorded per row as `attempts`), capped
by --retries, and tested against a server that answers 429 first.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tunelab.errors import TunelabError

RETRY_STATUS = {408, 409, 429}  # and every 5xx
FATAL_STATUS = {401: "the API key was refused: set OPENAI_API_KEY to a key this endpoint accepts",
                403: "the API key may not use this model", 404: "the endpoint has no such model (or path)"}


@dataclass(frozen=True)
class Generation:
    """How the teacher generates: the same for every row of a run (recorded in the part file's header)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Answer:
    """The teacher's reply to one prompt (keyed by the input's hash).

    error: the reason there is no text. retry_later: the error was a transient one that outlived the retries
    (the row is not recorded, so the next run asks again); otherwise it is final (e.g. a 400 for this prompt).
    """

    key: str
    text: str = ""
    finish_reason: str = "stop"
    attempts: int = 1
    error: str | None = None
    retry_later: bool = False


class Teacher(Protocol):
    """Answers prompts; `identity` says who answered (recorded with every kept row and in the registry)."""

    identity: dict

    def answer(self, items: list[tuple[str, list[dict]]], gen: Generation) -> Iterator[Answer]:
        """One Answer per (key, messages) item, in any order, each as soon as it is ready."""


class LocalTeacher:
    """A model loaded in-process (tunelab.infer): the engine batches the rows of each chunk itself."""

    def __init__(self, engine, identity: dict, adapter: str | None = None, batch_size: int = 16):
        self.engine, self.identity, self.adapter, self.batch_size = engine, identity, adapter, batch_size

    @classmethod
    def load(cls, spec: str, adapter: str | Path | None = None, dtype: str = "auto", device: str = "auto",
             batch_size: int = 16) -> LocalTeacher:
        """Load `spec` (bundled alias, HF folder, .gguf, hub id) with an optional PEFT adapter folder."""
        from tunelab.infer import load_engine
        from tunelab.models import identity
        from tunelab.runs.layout import file_sha256, weights_file

        engine = load_engine(spec, [adapter] if adapter else [], dtype=dtype, device=device)
        who = {"source": "local", **identity(spec)}
        if adapter is not None:
            weights = weights_file(Path(adapter))
            who["adapter"] = str(Path(adapter).resolve())
            who["adapter_sha256"] = file_sha256(weights) if weights else None
        return cls(engine, who, "adapter-1" if adapter else None, batch_size)

    def answer(self, items: list[tuple[str, list[dict]]], gen: Generation) -> Iterator[Answer]:
        from tunelab.infer import Request, SamplingParams

        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            params = SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, seed=gen.seed,
                                    stop=gen.stop)
            requests = [Request(messages, adapter=self.adapter, params=params) for _, messages in chunk]
            for (key, _), c in zip(chunk, self.engine.generate(requests)):
                yield Answer(key, c.text.strip(), "length" if c.finish_reason.startswith("length") else "stop")


class EndpointTeacher:
    """Any OpenAI-compatible chat endpoint through the official `openai` SDK, `concurrency` requests at once."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 120.0):
        """base_url: default $OPENAI_BASE_URL, else OpenAI's. api_key: default $OPENAI_API_KEY (required: give
        any value for a server without keys). retries: further attempts after the first, per row. backoff:
        the first wait in seconds, doubled each attempt up to max_backoff (a Retry-After header wins)."""
        try:
            import openai
        except ImportError:
            raise TunelabError("an openai: teacher needs the openai SDK: pip install 'tunelab[dev]' "
                               "(or pip install openai).") from None
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise TunelabError("--teacher openai:MODEL reads the API key from OPENAI_API_KEY, which is not set; "
                               "export it (any non-empty value for a local server without keys).")
        if concurrency < 1 or retries < 0:
            raise TunelabError(f"--concurrency must be at least 1 and --retries at least 0 (got {concurrency}, "
                               f"{retries}).")
        self.openai = openai
        self.client = openai.OpenAI(base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None, api_key=api_key,
                                    max_retries=0, timeout=timeout)
        self.model, self.concurrency, self.retries = model, concurrency, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.identity = {"source": "openai", "model": model, "base_url": str(self.client.base_url).rstrip("/")}

    def answer(self, items: list[tuple[str, list[dict]]], gen: Generation) -> Iterator[Answer]:
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="tunelab-distill")
        try:
            futures = [pool.submit(self._one, key, messages, gen) for key, messages in items]
            for f in as_completed(futures):
                yield f.result()
        finally:  # stopped early (an error, Ctrl-C): drop what has not started
            pool.shutdown(wait=False, cancel_futures=True)

    def _one(self, key: str, messages: list[dict], gen: Generation) -> Answer:
        o = self.openai
        extra = {"seed": gen.seed} if gen.seed is not None else {}
        if gen.stop:
            extra["stop"] = list(gen.stop)[:4]  # OpenAI's limit
        for attempt in range(1, self.retries + 2):
            try:
                r = self.client.chat.completions.create(model=self.model, messages=messages,
                                                        max_completion_tokens=gen.max_new_tokens,
                                                        temperature=gen.temperature, **extra)
                choice = r.choices[0]
                reason = "length" if choice.finish_reason == "length" else "stop"
                return Answer(key, (choice.message.content or "").strip(), reason, attempt)
            except o.APIStatusError as e:
                status = e.status_code
                if status in FATAL_STATUS:
                    raise TunelabError(f"{self.identity['base_url']} answered {status} for model {self.model!r}: "
                                       f"{FATAL_STATUS[status]} ({_message(e)}).") from None
                if status not in RETRY_STATUS and status < 500:
                    return Answer(key, attempts=attempt, error=f"the endpoint refused this prompt ({status}: "
                                                                f"{_message(e)})")
                why, wait = f"{status}: {_message(e)}", _retry_after(e.response.headers)
            except o.APIConnectionError as e:  # includes timeouts
                why, wait = f"connection: {e}", None
            if attempt > self.retries:
                return Answer(key, attempts=attempt, error=why, retry_later=True)
            time.sleep(self.delay(attempt, wait))
        raise AssertionError("unreachable")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt `attempt + 1`: Retry-After when given, else backoff * 2^(attempt-1) with
        jitter (between half and all of it), both capped at max_backoff."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff)
        full = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
        return full / 2 + random.uniform(0, full / 2)


def _message(e) -> str:
    body = e.body if isinstance(getattr(e, "body", None), dict) else {}
    return str(body.get("message") or (body.get("error") or {}).get("message") or e.message)[:200]


def _retry_after(headers) -> float | None:
    """Retry-After (seconds; or retry-after-ms) from a response's headers; None when absent or a date."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is not None:
            try:
                return float(value) / scale
            except ValueError:
                return None
    return None


def make_teacher(spec: str, adapter: str | Path | None = None, base_url: str | None = None, concurrency: int = 8,
                 retries: int = 5, dtype: str = "auto", device: str = "auto", batch_size: int = 16) -> Teacher:
    """`openai:MODEL` -> EndpointTeacher; anything else is a local model spec -> LocalTeacher."""
    if spec.startswith("openai:"):
        if adapter is not None:
            raise TunelabError("--adapter goes with a local teacher; an endpoint serves its adapters by model name "
                               "(--teacher openai:ADAPTER_NAME).")
        return EndpointTeacher(spec.removeprefix("openai:"), base_url, concurrency=concurrency, retries=retries)
    if base_url is not None:
        raise TunelabError(f"--base-url goes with --teacher openai:MODEL; {spec!r} is a local model.")
    return LocalTeacher.load(spec, adapter, dtype=dtype, device=device, batch_size=batch_size)
