"""Read JSONL files (strictly: every error names `file:line`) and normalise their rows to chat messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.formats import ACCEPTED, NORMALISERS, Messages, RowError, detect_format, to_messages
from tunelab.errors import TunelabError


@dataclass
class ChatDataset:
    """Rows of one file as chat messages, with the format they were read from and their line numbers."""

    path: str
    format: str
    rows: list[Messages] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # 1-based physical line of each row

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Messages]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> Messages:
        return self.rows[i]


def _read_text(path: Path) -> str:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise TunelabError(f"{path}: data file {what}; check the path (it is read relative to {Path.cwd()}).")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start:e.start + 1].hex()
        raise TunelabError(
            f"{path}:{line}: the file is not UTF-8 (byte 0x{bad} at byte offset {e.start}, column {col}). "
            "Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`."
        ) from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, row)` for each non-blank line; line numbers count every physical line from 1.

    Raises TunelabError naming `file:line` for a missing or non-UTF-8 file, malformed JSON, or a line
    that holds something other than a JSON object.
    """
    path = Path(path)
    # split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON strings may contain raw
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TunelabError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}). Each line must hold one "
                "complete JSON object; fix or delete the line (a record split over several lines is a common cause)."
            ) from None
        if not isinstance(row, dict):
            raise TunelabError(
                f"{path}:{lineno}: expected a JSON object on each line, got a {type(row).__name__} "
                f"({line.strip()[:60]}). Wrap the record in an object such as {{\"messages\": [...]}}."
            )
        yield lineno, row


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a JSONL file as dicts (blank lines skipped); errors name `file:line`."""
    return [row for _, row in iter_jsonl(path)]


def read_chat_file(path: str | Path, format: str | None = None) -> ChatDataset:
    """Read a JSONL file in any accepted format and normalise every row to chat messages.

    Args:
        path: the JSONL file.
        format: force a format ("chat", "prompt-completion", "alpaca", "sharegpt"); by default it is
            detected from the first row's keys, and every later row must have the same format.
    """
    if format is not None and format not in NORMALISERS:
        raise TunelabError(f"unknown data format {format!r}; use one of {', '.join(NORMALISERS)}.")
    out: ChatDataset | None = None
    first_line = 0
    for lineno, row in iter_jsonl(path):
        fmt = detect_format(row)
        if out is None:
            if fmt is None and format is None:
                raise TunelabError(
                    f"{path}:{lineno}: unknown row format (keys seen: {sorted(row)}). tunelab reads "
                    f"{ACCEPTED}; rename the keys to one of these."
                )
            out, first_line = ChatDataset(str(path), format or fmt), lineno
        elif format is None and fmt != out.format:
            raise TunelabError(
                f"{path}:{lineno}: this row looks like {fmt or 'no known format'} (keys: {sorted(row)}) but "
                f"the file is {out.format} (detected from line {first_line}); use one format per file."
            )
        try:
            out.rows.append(to_messages(row, out.format))
        except RowError as e:
            raise TunelabError(f"{path}:{lineno}: {e}.") from None
        out.lines.append(lineno)
    if out is None:
        raise TunelabError(f"{path}: the file has no rows; give one JSON object per line.")
    return out
