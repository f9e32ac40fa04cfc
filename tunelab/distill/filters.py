"""What a teacher's answer must pass to be kept: the task's own checks, length limits, and no duplicates.

The task checks are tunelab.evaluate's metrics that need no reference (an answer to a new prompt has none):
schema_valid for a task with a JSON Schema (json_valid for JSON without one), sql_valid for a task with a
database (the query runs, read-only, under a timeout). Lengths are counted in the student's tokens: the
answer (min_length drops empty or trivial answers) and the whole row with the chat template (max_length,
as `tunelab data check --max-length` counts it: what training would truncate).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from tunelab.distill.teachers import Answer
from tunelab.errors import TunelabError
from tunelab.evaluate.harness import output_kind
from tunelab.evaluate.metrics import check_inputs
from tunelab.models.overrides import require_chat_template
from tunelab.tasks import Task


def task_checks(task: Task) -> dict[str, dict]:
    """{metric name: its keyword inputs} for the reference-free checks of `task` (may be empty)."""
    kind, schema, db = output_kind(task), task.schema(), task.db_path
    checks: dict[str, dict] = {}
    if kind == "json":
        checks["json_valid"] = {}
        if schema is not None:
            checks["schema_valid"] = {"schema": schema}
    if db is not None:
        checks["sql_valid"] = {"db": db}
    return checks


def normalised(text: str) -> str:
    """Case and whitespace folded: two answers that differ only there are the same answer."""
    return " ".join(text.casefold().split())


def dedup_key(messages: list[dict], answer: str) -> str:
    """The hash of the normalised prompt turns and answer."""
    parts = [[m["role"], normalised(m["content"])] for m in messages] + [["assistant", normalised(answer)]]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Filters:
    """The checks of one run. `results` scores one answer; `Filters.seen` remembers kept rows for dedup."""

    tokenizer: object
    checks: dict[str, dict] = field(default_factory=dict)
    min_length: int = 1
    max_length: int | None = None
    keep_truncated: bool = False  # keep answers the teacher's max_new_tokens cut off
    seen: dict[str, int] = field(default_factory=dict)  # dedup key -> input line of the kept copy

    def __post_init__(self):
        if self.min_length < 0 or (self.max_length is not None and self.max_length < 1):
            raise TunelabError(f"--min-length must be 0 or more and --max-length 1 or more (got {self.min_length}, "
                               f"{self.max_length}).")
        self._metrics = {name: check_inputs(name, **inputs) for name, inputs in self.checks.items()}

    def describe(self) -> dict:
        """The filter settings, for the registry and the run's summary."""
        return {"checks": list(self.checks), "min_length": self.min_length, "max_length": self.max_length,
                "keep_truncated": self.keep_truncated, "dedup": "case- and whitespace-folded prompt + answer"}

    def _tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def results(self, line: int, messages: list[dict], answer: Answer) -> tuple[dict, str | None]:
        """(results, why it is dropped or None). Results: each check's score (and why it failed), the answer's
        and the row's token counts; a kept answer is remembered so a later copy is dropped as a duplicate."""
        if answer.error is not None:
            return {"teacher_error": answer.error}, f"teacher error: {answer.error}"
        out: dict = {}
        why = None
        if answer.finish_reason == "length" and not self.keep_truncated:
            why = "truncated: the teacher hit max_new_tokens"
        for name, metric in self._metrics.items():
            r = metric.compute(answer.text, None, **self.checks[name])
            out[name] = r.score
            if r.score < 1.0:
                out[f"{name}_detail"] = r.detail
                why = why or f"{name}: {r.detail or 'failed'}"
        out["answer_tokens"] = self._tokens(answer.text)
        if out["answer_tokens"] < self.min_length:
            why = why or f"too short: {out['answer_tokens']} answer tokens < {self.min_length}"
        if self.max_length is not None:
            row = [*messages, {"role": "assistant", "content": answer.text}]
            require_chat_template(self.tokenizer)
            out["row_tokens"] = self._tokens(self.tokenizer.apply_chat_template(row, tokenize=False))
            if out["row_tokens"] > self.max_length:
                why = why or f"too long: {out['row_tokens']} row tokens > {self.max_length}"
        if why is None:
            key = dedup_key(messages, answer.text)
            if key in self.seen:
                why = f"duplicate: the same prompt and answer as input line {self.seen[key]}"
            else:
                self.seen[key] = line
        out["duplicate"] = why is not None and why.startswith("duplicate:")
        return out, why
