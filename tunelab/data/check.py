"""`tunelab data check`: read a training file and report its shape (format, lengths, duplicates, problems)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.config.recipe import Recipe
from tunelab.data.pack import first_fit_decreasing
from tunelab.data.read import read_chat_file
from tunelab.data.tokenize import tokenize_dataset

DEFAULT_MAX_LENGTH = 2048
SHOW = 10  # line numbers listed per problem


@dataclass
class CheckReport:
    """What `check_file` found; line numbers are 1-based physical lines of the file."""

    path: str
    format: str
    rows: int
    max_length: int
    lengths: dict[str, int] | None = None  # p50/p90/p99/max tokens with the chat template; None without tokenizer
    tokens: int | None = None
    duplicates: int = 0  # rows identical (after normalisation) to an earlier row
    duplicate_lines: list[tuple[int, int]] = field(default_factory=list)  # (line, line of its first copy)
    empty: int = 0  # rows whose every assistant reply is empty
    empty_lines: list[int] = field(default_factory=list)
    too_long: int = 0  # rows longer than max_length tokens
    too_long_lines: list[int] = field(default_factory=list)
    training: str | None = None  # what `tunelab train data.train=FILE` does with these rows by default

    @property
    def ok(self) -> bool:
        """No duplicates, empty replies or over-long rows."""
        return not (self.duplicates or self.empty or self.too_long)

    def to_dict(self) -> dict:
        """Plain JSON-ready data (for `tunelab data check --json`)."""
        return asdict(self) | {"ok": self.ok}


def _default_max_length(tokenizer) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1_000_000 else DEFAULT_MAX_LENGTH  # HF uses 1e30 for "unset"


def _percentile(sorted_values: list[int], q: float) -> int:
    """The smallest value with at least q% of values at or below it (an observed length)."""
    return sorted_values[max(0, math.ceil(len(sorted_values) * q / 100) - 1)]


def check_file(path: str | Path, tokenizer=None, max_length: int | None = None) -> CheckReport:
    """Read `path` (any accepted format) and report rows, format, lengths, duplicates and problems.

    Args:
        path: a JSONL training file.
        tokenizer: the model's tokenizer; token lengths (chat template applied) need it.
        max_length: rows longer than this are reported (default: the tokenizer's limit, else 2048).

    A malformed file raises TunelabError naming `file:line`.
    """
    data = read_chat_file(path)
    if max_length is None:
        max_length = _default_max_length(tokenizer) if tokenizer is not None else DEFAULT_MAX_LENGTH
    report = CheckReport(path=str(path), format=data.format, rows=len(data), max_length=max_length)

    seen: dict[str, int] = {}
    for line, messages in zip(data.lines, data.rows):
        key = json.dumps(messages, ensure_ascii=False)
        if key in seen:
            report.duplicates += 1
            report.duplicate_lines.append((line, seen[key]))
        else:
            seen[key] = line
        if all(not m["content"].strip() for m in messages if m["role"] == "assistant"):
            report.empty += 1
            report.empty_lines.append(line)

    if tokenizer is not None:
        examples, _ = tokenize_dataset(tokenizer, data.rows, prompt_loss_weight=1.0, max_length=None)
        lengths = [len(ex) for ex in examples]
        for ex in examples:
            if len(ex) > max_length:
                report.too_long += 1
                report.too_long_lines.append(data.lines[ex.index])
        ordered = sorted(lengths)
        report.tokens = sum(lengths)
        report.lengths = {f"p{q}": _percentile(ordered, q) for q in (50, 90, 99)} | {"max": ordered[-1]}
        report.training = default_training(lengths)
    for name in ("duplicate_lines", "empty_lines", "too_long_lines"):
        setattr(report, name, getattr(report, name)[:SHOW])
    return report


def default_training(lengths: list[int]) -> str:
    """What `tunelab train data.train=FILE` does, with the default recipe, with rows of these token lengths: the
    rows held out for validation, the packed training sequences, and the batch (fitted to small data)."""
    recipe = Recipe()
    d, t = recipe.data, recipe.train
    held = d.held_out(len(lengths))
    train = [min(n, t.max_length) for n in lengths[held:]]  # which rows are held out is seeded; any do here
    if not train:
        return (f"all {len(lengths)} row(s) would be held out for validation (data.validation_fraction="
                f"{d.validation_fraction:g}): add rows, or give data.validation=FILE")
    sequences = len(first_fit_decreasing(train, t.max_length)) if t.packing else len(train)
    head = (f"{held} row(s) held out for validation; {len(train)} training row(s) -> {sequences} sequence(s) "
            f"of up to {t.max_length} tokens; ")
    _, note = recipe.fit_to_data(sequences)
    if note:
        return head + note
    steps = sequences // (t.batch_size * recipe.accumulation())
    return head + (f"batch_size {t.batch_size} x grad_accum {recipe.accumulation()}: {steps} optimizer step(s) "
                   f"per epoch, {t.epochs:g} epochs")
