"""Progress for long work: a rich bar on a terminal, else a plain line every 5% or 30 s (logs, CI, pipes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def progress(label: str, total: int, console: Console, show: bool = True, done: int = 0,
             unit: str = "done", seconds: float = 30.0) -> Iterator[Callable[[int], None]]:
    """Yields update(n): n items of `total` are finished (counting from 0, `done` already were)."""
    if not show or total <= done:
        yield lambda n: None
        return
    if console.is_terminal:
        with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console) as bar:
            tid = bar.add_task(label, total=total, completed=done)
            yield lambda n: bar.update(tid, completed=n)
        return
    every = max(1, total // 20)
    t0 = time.time()
    state = {"n": done, "printed": t0}

    def update(n: int) -> None:
        now = time.time()
        crossed = n // every > state["n"] // every
        if n > state["n"] and (crossed or n >= total or now - state["printed"] >= seconds):
            rate = (now - t0) / max(1, n - done)
            console.print(f"{label} {n}/{total} {unit}, {now - t0:.0f} s, ETA {rate * (total - n):.0f} s",
                          highlight=False, soft_wrap=True)
            state["printed"] = now
        state["n"] = max(state["n"], n)

    yield update
