"""Output checks after generation (the guide's "belt-and-suspenders"): regex and word lists, the refusal
detector, and a judge prompt on a local model; each flags or blocks an answer.

A tenant lists its checks in keys.yaml (`checks:` under the tenant; schema `CheckSpec`, validated on load):

    checks:
      - {name: card-number, regex: '\\b(?:\\d[ -]?){13,16}\\b', action: block}
      - {name: competitors, words: [rivalco, cheapmart]}                 # action defaults to flag
      - {name: refusal, refusal: true}                                   # tunelab.evaluate's refusal detector
      - name: rude
        judge: {prompt: "Is this answer rude? Answer yes or no.\\n\\n{answer}", flag_if: "^\\\\s*yes"}

The server calls `run_checks` on every answer before it returns and logs it: the names of the checks that hit
go to the request log (LogRow.flags); a hit of a `block` check replaces the answer with finish_reason
"content_filter" (what the OpenAI API returns when its content filter omits an answer).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.evaluate.metrics.refusal import is_refusal

log = logging.getLogger(__name__)
KINDS = ("regex", "words", "refusal", "judge")
CHECK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BLOCKED = "content_filter"  # OpenAI's finish_reason for an answer its content filter omitted


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None


class JudgeSpec(BaseModel):
    """A judge prompt on a local model: flags the answer when the judge's reply matches `flag_if`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str  # the judge's user message; {answer} is the answer, {prompt} the request's last user message
    flag_if: str = r"^\s*yes\b"  # regex (case-insensitive) on the judge's reply that means "hit"
    model: str | None = None  # a local model (bundled alias, HF folder, .gguf) loaded once; None: the served base
    adapter: str | None = None  # on the served engine: this adapter of the server (None: the base)
    max_tokens: int = Field(8, ge=1, le=256)

    @field_validator("prompt")
    @classmethod
    def _has_answer(cls, v: str) -> str:
        if "{answer}" not in v:
            raise ValueError("the judge prompt must contain {answer} (where the answer goes)")
        return v

    @field_validator("flag_if")
    @classmethod
    def _regex(cls, v: str) -> str:
        _compile(v)
        return v

    @model_validator(mode="after")
    def _one_model(self) -> JudgeSpec:
        if self.model is not None and self.adapter is not None:
            raise ValueError("give judge.model (a separate local model) or judge.adapter (one the server serves), "
                             "not both")
        return self


class CheckSpec(BaseModel):
    """One output check in keys.yaml: exactly one of regex, words, refusal, judge; action flag or block."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # logged in LogRow.flags; default: the kind (regex, words, refusal, judge)
    action: Literal["flag", "block"] = "flag"
    regex: str | None = None  # Python regex searched in the answer
    words: list[str] | None = Field(None, min_length=1)  # whole words or phrases, case-insensitive
    refusal: bool = False  # tunelab.evaluate's refusal detector
    judge: JudgeSpec | None = None

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            _compile(v)
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> CheckSpec:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of regex, words, refusal: true, judge (got "
                             f"{', '.join(given) or 'none'})")
        self.name = self.name or given[0]
        if not CHECK_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, '.', '_', '-' (up to 64)")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


def unique_names(specs: Sequence[CheckSpec]) -> list[CheckSpec]:
    """`specs` when their names are distinct; a ValueError naming the duplicate otherwise."""
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"two checks are named {s.name!r}; give each check its own name (it is what the "
                             "request log records)")
        seen.add(s.name)
    return list(specs)


Judge = Callable[[JudgeSpec, list[dict]], str]  # (the judge's spec, chat messages) -> the judge's reply


@dataclass(frozen=True, eq=False)
class Check:
    """A compiled CheckSpec: `hit(answer, prompt, judge)` says whether it fires."""

    spec: CheckSpec
    pattern: re.Pattern | None = None

    @classmethod
    def build(cls, spec: CheckSpec) -> Check:
        if spec.regex is not None:
            return cls(spec, _compile(spec.regex))
        if spec.words is not None:
            alts = "|".join(r"\s+".join(map(re.escape, w.split())) for w in spec.words)
            return cls(spec, re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE))
        if spec.judge is not None:
            return cls(spec, re.compile(spec.judge.flag_if, re.IGNORECASE))
        return cls(spec)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def blocks(self) -> bool:
        return self.spec.action == "block"

    def hit(self, answer: str, prompt: str | None = None, judge: Judge | None = None) -> bool:
        if self.spec.refusal:
            return is_refusal(answer)
        if self.spec.judge is None:
            return self.pattern.search(answer) is not None
        if judge is None:
            raise RuntimeError(f"check {self.name!r} needs a judge model and none was given")
        text = self.spec.judge.prompt.replace("{answer}", answer).replace("{prompt}", prompt or "")
        reply = judge(self.spec.judge, [{"role": "user", "content": text}])
        return self.pattern.search(reply) is not None


def compile_checks(specs: Sequence[CheckSpec]) -> tuple[Check, ...]:
    return tuple(Check.build(s) for s in unique_names(specs))


@dataclass
class CheckResult:
    flags: list[str] = field(default_factory=list)  # names of the checks that hit (flag and block alike)
    blocked: bool = False
    blocked_by: str | None = None  # the first block check that hit

    def message(self) -> str | None:
        """What a blocked answer says instead (the `refusal` field of the OpenAI message)."""
        return (f"The answer was withheld by the output check {self.blocked_by!r}." if self.blocked else None)


def prompt_text(prompt) -> str | None:
    """The request's last user message (chat messages), or a completion's prompt: a judge prompt's {prompt}."""
    if isinstance(prompt, str) or prompt is None:
        return prompt
    return next((m.get("content") for m in reversed(prompt) if isinstance(m, dict) and m.get("role") == "user"),
                None)


def run_checks(tenant_checks: Sequence[Check | CheckSpec], answer: str, *, prompt: str | None = None,
               judge: Judge | None = None) -> CheckResult:
    """Run a tenant's checks on one answer. prompt: the request's last user message (for judge prompts);
    judge: generates a judge's reply (the server passes one that runs on its engine). A check that fails to
    run (its judge errs) is logged and flagged as NAME:error; it never blocks."""
    result = CheckResult()
    for c in tenant_checks:
        c = c if isinstance(c, Check) else Check.build(c)
        try:
            hit = c.hit(answer, prompt, judge)
        except Exception as e:  # noqa: BLE001 - a broken judge must not fail the request it checks
            log.warning(f"output check {c.name!r} failed: {type(e).__name__}: {e}")
            result.flags.append(f"{c.name}:error")
            continue
        if hit:
            result.flags.append(c.name)
            if c.blocks and not result.blocked:
                result.blocked, result.blocked_by = True, c.name
    return result


class LocalJudges:
    """Judge models given by `judge.model`, each loaded once (on first use) and asked greedily, one at a time."""

    def __init__(self):
        import threading

        self._engines: dict[str, object] = {}
        self._lock = threading.Lock()

    def __call__(self, spec: JudgeSpec, messages: list[dict]) -> str:
        from tunelab.infer import Request, SamplingParams, load_engine

        with self._lock:
            if spec.model not in self._engines:
                self._engines[spec.model] = load_engine(spec.model)
            engine = self._engines[spec.model]
            params = SamplingParams(max_new_tokens=spec.max_tokens, temperature=0.0)
            return engine.generate([Request(messages, params=params)])[0].text


LOCAL_JUDGES = LocalJudges()  # judge models named by `judge.model`, shared by every tenant of this process


async def check_answers(tenant_checks: Sequence[Check], answers: list[str], prompt: str | None = None,
                        served: Callable[[JudgeSpec, list[dict]], Awaitable[str]] | None = None,
                        timeout_s: float = 60.0) -> list[CheckResult]:
    """`run_checks` on each answer, from the server's event loop. served: generates a judge's reply on the
    served engine (judges without `model`); judges run on a worker thread, so the loop stays free."""
    if not any(c.spec.judge is not None for c in tenant_checks):
        return [run_checks(tenant_checks, a, prompt=prompt) for a in answers]
    import asyncio

    loop = asyncio.get_running_loop()

    def judge(spec: JudgeSpec, messages: list[dict]) -> str:
        if spec.model is not None:
            return LOCAL_JUDGES(spec, messages)
        if served is None:
            raise RuntimeError("no served engine to run the judge on")
        return asyncio.run_coroutine_threadsafe(served(spec, messages), loop).result(timeout_s)

    return await asyncio.to_thread(lambda: [run_checks(tenant_checks, a, prompt=prompt, judge=judge)
                                            for a in answers])
