"""A loaded task: its spec, examples per split, reference text and chat messages for training/eval."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from tunelab.config.task import TaskSpec, load_task_spec
from tunelab.errors import TunelabError

TASKS_DIR = Path(__file__).resolve().parent


def canonical_json(value: Any) -> str:
    """The one canonical JSON text of a reference object: keys in stored order, no spaces (`,` and `:`).

    Non-ASCII characters are kept as they are (ensure_ascii=False); whole-number prices are stored as
    integers and others as floats with at most two decimals, so `json.loads` round-trips the text.
    """
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Task:
    """A task folder: `task.yaml` plus its JSONL splits and assets (schema, database, corpus)."""

    def __init__(self, spec: TaskSpec, folder: Path):
        self.spec = spec
        self.dir = folder

    @classmethod
    def from_dir(cls, folder: str | Path) -> Task:
        """Load the task whose task.yaml lives in `folder`."""
        folder = Path(folder).resolve()
        return cls(load_task_spec(folder / "task.yaml"), folder)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, kind={self.kind!r}, dir={str(self.dir)!r})"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    # ---- files -------------------------------------------------------------------------------------

    def _asset(self, rel: str | None, what: str) -> Path | None:
        if rel is None:
            return None
        path = self.dir / rel
        if not path.is_file():
            raise TunelabError(f"{self.dir / 'task.yaml'}: {what} file {rel!r} does not exist in {self.dir}")
        return path

    def split_path(self, split: str) -> Path:
        """The JSONL file of a split; an unknown split name raises a TunelabError listing the splits."""
        if split not in self.spec.splits:
            raise TunelabError(
                f"task {self.name!r} has no split {split!r}; its splits are {', '.join(self.spec.splits)}"
            )
        path = self._asset(self.spec.splits[split], f"split {split!r}")
        assert path is not None
        return path

    def examples(self, split: str, limit: int | None = None) -> list[dict]:
        """The examples of a split, in file order (the first `limit` when given)."""
        path = self.split_path(split)
        rows: list[dict] = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TunelabError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
        return rows

    def split_sizes(self) -> dict[str, int]:
        """Number of examples in each split."""
        sizes = {}
        for split in self.spec.splits:
            with self.split_path(split).open(encoding="utf-8") as f:
                sizes[split] = sum(1 for line in f if line.strip())
        return sizes

    def schema(self) -> dict | None:
        """The task's JSON Schema (a dict), or None when the task has none."""
        path = self._asset(self.spec.schema_file, "schema")
        return json.loads(path.read_text(encoding="utf-8")) if path else None

    @property
    def db_path(self) -> Path | None:
        """The task's SQLite database, or None."""
        return self._asset(self.spec.database, "database")

    @cached_property
    def _corpus(self) -> list[dict] | None:
        path = self._asset(self.spec.corpus, "corpus")
        if path is None:
            return None
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def corpus(self) -> list[dict] | None:
        """The task's documents ({id, title, text}), or None when it has no corpus."""
        return None if self._corpus is None else [dict(d) for d in self._corpus]

    # ---- text --------------------------------------------------------------------------------------

    def reference(self, example: dict) -> str:
        """The text a model should output for `example`.

        Strings are returned as stored; objects (orders-json) as `canonical_json`. A task without a
        reference field (safety) returns "" - its metric reads other fields such as `should_refuse`.
        """
        field = self.spec.reference_field
        if field is None:
            return ""
        if field not in example:
            raise TunelabError(f"task {self.name!r}: example {example.get('id', '?')!r} has no field {field!r}")
        value = example[field]
        return value if isinstance(value, str) else canonical_json(value)

    def check(self, example: dict) -> tuple[str, Any]:
        """(metric name, reference) to score `example` with: its own check when the task has a
        `check_field` (general), else (primary_metric, reference text)."""
        field = self.spec.check_field
        if field is None:
            return self.spec.primary_metric, self.reference(example)
        check = example.get(field)
        if not isinstance(check, dict) or check.get("metric") not in self.spec.metrics or "reference" not in check:
            raise TunelabError(
                f"task {self.name!r}: example {example.get('id', '?')!r} needs {field!r} = "
                f"{{'metric': one of {self.spec.metrics}, 'reference': ...}}"
            )
        return check["metric"], check["reference"]

    def prompt(self, example: dict) -> str:
        """The user message for `example`: prompt_template filled from its input fields."""
        try:
            return self.spec.prompt_template.format(**{k: example[k] for k in self.spec.input_fields})
        except KeyError as e:
            raise TunelabError(
                f"task {self.name!r}: example {example.get('id', '?')!r} lacks input field {e.args[0]!r}"
            ) from None

    def messages(
        self,
        example: dict,
        with_answer: bool = False,
        few_shot: list[dict] | tuple = (),
    ) -> list[dict]:
        """Chat messages for `example`: system prompt, few-shot user/assistant pairs, then the user turn.

        with_answer: append the reference as the assistant turn (for training).
        few_shot: examples whose prompt and reference become earlier turns.
        """
        msgs: list[dict] = []
        if self.spec.system_prompt:
            msgs.append({"role": "system", "content": self.spec.system_prompt.strip()})
        for shot in few_shot:
            msgs.append({"role": "user", "content": self.prompt(shot)})
            msgs.append({"role": "assistant", "content": self.reference(shot)})
        msgs.append({"role": "user", "content": self.prompt(example)})
        if with_answer:
            msgs.append({"role": "assistant", "content": self.reference(example)})
        return msgs


def list_tasks() -> list[Task]:
    """Every bundled task, sorted by name."""
    return [Task.from_dir(p.parent) for p in sorted(TASKS_DIR.glob("*/task.yaml"))]


def load_task(name_or_path: str | Path) -> Task:
    """A bundled task by name, or a folder (or its task.yaml) holding a task of your own."""
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.name == "task.yaml":
        return Task.from_dir(p.parent)
    if p.is_dir() and (p / "task.yaml").is_file():
        return Task.from_dir(p)
    bundled = TASKS_DIR / str(name_or_path) / "task.yaml"
    if "/" not in str(name_or_path) and bundled.is_file():
        return Task.from_dir(bundled.parent)
    names = [t.name for t in list_tasks()]
    raise TunelabError(
        f"unknown task {str(name_or_path)!r}: bundled tasks are {', '.join(names)}; "
        "or give a folder that holds a task.yaml"
    )


def tasks_table() -> list[dict]:
    """One row per bundled task for `tunelab tasks --json`.

    Keys: name, kind, description (first line), metrics, primary_metric, path (the task folder) and
    splits = {split: {"size": examples, "path": JSONL file}}.
    """
    rows = []
    for t in list_tasks():
        sizes = t.split_sizes()
        rows.append({
            "name": t.name,
            "kind": t.kind,
            "description": t.spec.description.strip().splitlines()[0],
            "metrics": list(t.spec.metrics),
            "primary_metric": t.spec.primary_metric,
            "path": str(t.dir),
            "splits": {s: {"size": sizes[s], "path": str(t.split_path(s))} for s in t.spec.splits},
        })
    return rows
