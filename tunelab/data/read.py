"""Read chat data files and normalise their rows to chat messages (JSONL itself is read by tunelab.runs.layout)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.formats import ACCEPTED, NORMALISERS, Messages, RowError, detect_format, to_messages
from tunelab.errors import TunelabError
from tunelab.runs.layout import iter_jsonl, read_jsonl

__all__ = ["ChatDataset", "iter_jsonl", "read_chat_file", "read_jsonl"]


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
