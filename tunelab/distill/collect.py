"""`tunelab data distill`: a teacher answers every prompt; what passes the filters becomes training rows.

Every answer is appended to OUT.part (one JSON line per prompt, flushed and fsynced) under the hash of its
prompt, so a killed run continues where it stopped: prompts already answered are not asked again, and none
is written twice. When every prompt has an answer, the filters run in input order, the kept rows are
written to OUT (the chat format `tunelab train` reads, plus a `distill` field saying who answered and what
each filter found) and the dropped ones to OUT's .rejected.jsonl, both by temp file + rename; then the
part file goes and OUT is registered with its teacher. Who may train on whose outputs is the user's call
(model licences and terms of service differ), so the teacher is always recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.config.paths import DEFAULT_MODEL
from tunelab.data import RowError, iter_jsonl, prompt_messages
from tunelab.distill.filters import Filters, task_checks
from tunelab.distill.teachers import Answer, Generation, Teacher, make_teacher
from tunelab.errors import TunelabError
from tunelab.progress import progress
from tunelab.runs import register_distilled
from tunelab.runs.layout import write_jsonl

log = logging.getLogger(__name__)
PART_FORMAT = 1
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class DistillResult:
    """What a run did. asked: prompts sent to the teacher by this run; resumed: answers an earlier run left
    in the part file; retries: attempts beyond the first (endpoint teachers); dropped: count per reason."""

    out: Path
    rejected: Path
    prompts: int
    asked: int
    resumed: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    teacher: dict = field(default_factory=dict)
    filters: dict = field(default_factory=dict)
    dataset_id: int | None = None


def input_key(messages: list[dict]) -> str:
    """The key of a prompt in the part file: the hash of its messages."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def read_prompts(path: Path) -> list[tuple[int, dict, list[dict]]]:
    """(line, row, prompt messages) per row of a JSONL of prompts; errors name file:line."""
    rows = []
    for line, row in iter_jsonl(path):
        try:
            rows.append((line, row, prompt_messages(row)))
        except RowError as e:
            raise TunelabError(f"{path}:{line}: {e}.") from None
    if not rows:
        raise TunelabError(f"{path}: no prompts; give one JSON object a line with `messages` or `prompt`.")
    return rows


class PartFile:
    """The append-only answers of a run so far: a header line (teacher, generation), then one line a prompt."""

    def __init__(self, path: Path, header: dict):
        self.path, self.answers = path, {}
        header = json.loads(json.dumps({"tunelab_distill_part": PART_FORMAT, **header}))
        if path.exists():
            self._load(header)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                self._write(f, header)
        self.f = open(path, "a", encoding="utf-8")

    @staticmethod
    def _write(f, obj: dict) -> None:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def _load(self, header: dict) -> None:
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # a run killed mid-line leaves a partial last line: cut it off
        lines = data[:good].decode("utf-8").split("\n")[:-1]
        try:
            found = json.loads(lines[0]) if lines else None
            rows = [json.loads(x) for x in lines[1:]]
        except json.JSONDecodeError as e:
            raise TunelabError(f"{self.path} is damaged ({e}); delete it to start the distillation over.") from None
        if found != header:
            raise TunelabError(f"{self.path} holds answers of another run (it has {_differs(found, header)}); run "
                               "with the same teacher and generation options to continue it, or delete it to "
                               "start over.")
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        self.answers = {r["key"]: Answer(**r) for r in rows}

    def add(self, answer: Answer) -> None:
        self._write(self.f, asdict(answer))
        self.answers[answer.key] = answer

    def close(self) -> None:
        self.f.close()


def _differs(found: dict | None, want: dict) -> str:
    if not isinstance(found, dict):
        return "no header"
    keys = [k for k in want if found.get(k) != want[k]]
    return "; ".join(f"{k} {found.get(k)!r}, this run {want[k]!r}" for k in keys) or "another format"


def distill(teacher: str | Teacher, inputs: str | Path, out: str | Path, *, adapter: str | Path | None = None,
            base_url: str | None = None, task: str | None = None, max_new_tokens: int | None = None,
            temperature: float = 0.0, seed: int | None = None, concurrency: int = 8, retries: int = 5,
            min_length: int = 1, max_length: int | None = None, keep_truncated: bool = False,
            student: str = DEFAULT_MODEL,
            batch_size: int = 16, dtype: str = "auto", device: str = "auto",
            show_progress: bool = True) -> DistillResult:
    """Answer every prompt of `inputs` with `teacher` and write the answers that pass the filters to `out`.

    teacher: a local model spec (bundled alias, HF folder, .gguf, hub id; with `adapter`) or openai:MODEL
    for an OpenAI-compatible endpoint (base_url or $OPENAI_BASE_URL, key $OPENAI_API_KEY; `concurrency`
    requests at once, `retries` more attempts on 429 / 5xx / connection errors). inputs: JSONL rows with
    `messages` (a trailing assistant turn is dropped) or `prompt`. task: a task whose checks filter the
    answers (schema-valid JSON, SQL that runs) and whose max_new_tokens and stop strings are the defaults.
    min_length / max_length: tokens of the answer / of the whole row, counted by `student`'s tokenizer.
    keep_truncated: keep answers cut off by max_new_tokens (dropped by default).
    batch_size: rows per engine call of a local teacher. A killed run continues when run again.
    """
    from tunelab.models import load_tokenizer
    from tunelab.tasks import load_task

    inputs, out = Path(inputs), Path(out)
    prompts = read_prompts(inputs)
    part_path = out.with_name(out.name + ".part")
    rejected = out.with_name(out.stem + ".rejected.jsonl")
    if out.exists() and not part_path.exists():
        raise TunelabError(f"{out} exists; choose another --out or delete it (nothing was overwritten).")
    t = load_task(task) if task else None
    gen = Generation(max_new_tokens or (t.spec.max_new_tokens if t else DEFAULT_MAX_NEW_TOKENS), temperature,
                     seed, tuple(t.spec.stop) if t else ())
    filters = Filters(load_tokenizer(student), task_checks(t) if t else {}, min_length, max_length, keep_truncated)
    if isinstance(teacher, str):
        teacher = make_teacher(teacher, adapter, base_url, concurrency, retries, dtype, device, batch_size)
    part = PartFile(part_path, {"teacher": teacher.identity, "generation": asdict(gen)})
    keys = {input_key(m): m for _, _, m in prompts}
    todo = [(k, m) for k, m in keys.items() if k not in part.answers]
    resumed = len(keys) - len(todo)
    if resumed and show_progress:
        log.info(f"resuming: {resumed} of {len(keys)} prompts answered in {part_path}")
    late: list[Answer] = []
    extra_attempts = 0
    try:
        with progress("distill", len(keys), show_progress, done=resumed, unit="answered") as update:
            for n, a in enumerate(teacher.answer(todo, gen), start=resumed + 1):
                extra_attempts += a.attempts - 1
                if a.retry_later:  # a transient error outlived the retries: not recorded, asked again next run
                    late.append(a)
                else:
                    part.add(a)
                update(n)
    finally:
        part.close()
    if late:
        raise TunelabError(f"{len(late)} prompts got no answer after {late[-1].attempts} attempts each (last error: "
                           f"{late[-1].error}); the {len(part.answers)} answers so far are kept in {part_path}: "
                           "run the same command again to ask for the rest.")
    kept, dropped = [], []
    for line, row, messages in prompts:
        a = part.answers[input_key(messages)]
        results, why = filters.results(line, messages, a)
        info = {"teacher": teacher.identity, "filters": results, "finish_reason": a.finish_reason,
                "attempts": a.attempts, "source": f"{inputs.name}:{line}"}
        new = {**({"id": row["id"]} if "id" in row else {}),
               "messages": [*messages, {"role": "assistant", "content": a.text}], "distill": info}
        if why is None:
            kept.append(new)
        else:
            info["dropped"] = why
            dropped.append(new)
    write_jsonl(rejected, dropped)
    write_jsonl(out, kept)
    part_path.unlink()
    reasons = dict(Counter(r["distill"]["dropped"].split(":")[0] for r in dropped).most_common())
    meta = {"distill": {"generation": asdict(gen), "filters": filters.describe(), "task": t.name if t else None,
                        "prompts": len(prompts), "kept": len(kept), "dropped": reasons}}
    return DistillResult(out, rejected, len(prompts), len(todo), resumed, len(kept), reasons, extra_attempts,
                         teacher.identity, filters.describe(), register_distilled(out, inputs, teacher.identity, meta))
