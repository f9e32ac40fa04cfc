"""A task made from one JSONL file of your own (chat or prompt/completion), so no task folder is written by hand."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from tunelab.config.task import TaskSpec
from tunelab.data import read_chat_file
from tunelab.errors import TunelabError
from tunelab.tasks.task import Task

SPLIT = "test"  # the file is the one split


class DataTask(Task):
    """Examples of one JSONL file: the conversation before the last assistant turn is the prompt, and that
    turn is the reference. Any format `tunelab data check` reads works (chat, prompt/completion, alpaca,
    sharegpt); each example is {"id": "line-N", "messages": [...], "reference": "..."}."""

    @classmethod
    def from_file(cls, path: str | Path, metrics: list[str], schema: str | Path | None = None,
                  database: str | Path | None = None, max_new_tokens: int = 256) -> DataTask:
        """The task for `path`, scored with `metrics` (the first is the primary one); `schema` (a JSON Schema
        file) and `database` (a SQLite file) for the metrics that need them."""
        path = Path(path).resolve()
        slug = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_") or "data"
        try:
            spec = TaskSpec(name=slug, kind="form", description=f"examples from {path}", prompt_template="{prompt}",
                            input_fields=["prompt"], reference_field="reference", metrics=metrics,
                            primary_metric=metrics[0], schema=str(Path(schema).resolve()) if schema else None,
                            database=str(Path(database).resolve()) if database else None,
                            splits={SPLIT: path.name}, max_new_tokens=max_new_tokens)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise TunelabError(f"tunelab eval --data {path}: {problems}") from None
        return cls(spec, path.parent)

    def examples(self, split: str, limit: int | None = None) -> list[dict]:
        """Every row is read and checked (errors name file:line); the first `limit` are returned."""
        path = self.split_path(split)
        data = read_chat_file(path)
        rows = []
        for messages, line in zip(data.rows, data.lines):
            if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages[:-1]):
                raise TunelabError(f"{path}:{line}: the row must end with the assistant's answer, after a user "
                                   "turn: that answer is the reference the output is scored against.")
            rows.append({"id": f"line-{line}", "messages": messages[:-1], "reference": messages[-1]["content"]})
        return rows if limit is None else rows[:limit]

    def reference(self, example: dict) -> str:
        return example["reference"]

    def prompt(self, example: dict) -> str:
        """The last user turn (the whole conversation is what the model sees)."""
        return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "user")

    def messages(self, example: dict, with_answer: bool = False, few_shot: list[dict] | tuple = (),
                 context: str | None = None) -> list[dict]:
        """The row's conversation; few-shot rows' conversations go first, context before the last user turn."""
        msgs = [dict(m) for shot in few_shot for m in self.messages(shot, with_answer=True)]
        msgs += [dict(m) for m in example["messages"]]
        if context:
            last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
            msgs[last]["content"] = f"Context:\n{context.strip()}\n\n{msgs[last]['content']}"
        if with_answer:
            msgs.append({"role": "assistant", "content": example["reference"]})
        return msgs
