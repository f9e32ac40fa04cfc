"""The task schema: what a task.yaml holds (prompting, reference field, metrics, splits, assets)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.errors import TunelabError

TaskKind = Literal["form", "dialect", "facts", "regression", "safety"]
MetricName = Literal[  # every name in tunelab.evaluate.metrics.METRICS (a test keeps them in step)
    "exact_match", "contains", "regex", "json_valid", "json_valid_lenient", "schema_valid", "schema_valid_lenient",
    "json_exact", "json_exact_lenient", "field_f1", "field_f1_lenient", "rouge_l", "bleu", "chrf", "sql_exec",
    "sql_valid", "refusal",
]


class TaskSpec(BaseModel):
    """One task.yaml. Paths (schema, database, corpus, split files) are relative to the task folder."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: TaskKind
    description: str
    system_prompt: str | None = None
    prompt_template: str  # str.format over the example's input fields, e.g. "{message}"
    input_fields: list[str] = Field(min_length=1)
    reference_field: str | None = None  # None: the task has no target text (safety probes)
    # An example field holding {"metric": name, "reference": value}: that example is scored with its own
    # metric and reference instead of `metrics` on the reference text (general: regex/contains checks).
    check_field: str | None = None
    metrics: list[MetricName] = Field(min_length=1)
    primary_metric: MetricName
    schema_file: str | None = Field(None, alias="schema")  # JSON Schema the output must satisfy
    database: str | None = None  # SQLite file the gold SQL runs against
    corpus: str | None = None  # JSONL of {id, title, text} documents
    splits: dict[str, str] = Field(min_length=1)  # split name -> JSONL file
    max_new_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} must be one of metrics {self.metrics}")
        used = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f}
        missing = sorted(used - set(self.input_fields))
        if missing:
            raise ValueError(f"prompt_template uses {missing}, which are not in input_fields {self.input_fields}")
        if {"schema_valid", "schema_valid_lenient"} & set(self.metrics) and self.schema_file is None:
            raise ValueError("metric schema_valid needs `schema:` (a JSON Schema file in the task folder)")
        if {"sql_exec", "sql_valid"} & set(self.metrics) and self.database is None:
            raise ValueError("metrics sql_exec and sql_valid need `database:` (a SQLite file in the task folder)")
        return self


def load_task_spec(path: str | Path) -> TaskSpec:
    """Read and validate a task.yaml; errors name the file and the offending field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise TunelabError(f"cannot read task file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TunelabError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TunelabError(f"{p}: a task.yaml is a mapping (name:, kind:, prompt_template:, splits: ...)")
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(task)"
            if err["type"] == "extra_forbidden":
                known = sorted(f.alias or n for n, f in TaskSpec.model_fields.items())
                lines.append(f"unknown key {where!r}; valid keys: {', '.join(known)}")
            else:
                lines.append(f"{where}: {err['msg']}")
        raise TunelabError(f"{p}: invalid task:\n  " + "\n  ".join(lines)) from None
