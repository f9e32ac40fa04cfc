"""Progress of long work: library code reports through `progress()`; the caller installs the sink that shows it.

Library functions never draw anything. `with progress("eval", total) as update: ... update(n)` reports to the
sink installed with `set_sink` (the CLI installs one that draws a bar on a terminal and plain lines in a log);
with no sink, nothing is shown and the updates cost one function call each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

Update = Callable[..., None]  # update(n, info=""): n items finished; info, a short status (e.g. the loss)


class Sink(Protocol):
    """Shows one piece of work: entered when it starts, yields its update function, exited when it ends."""

    def __call__(self, label: str, total: int, done: int, unit: str) -> AbstractContextManager[Update]: ...


_SINK: list[Sink | None] = [None]


def set_sink(sink: Sink | None) -> Sink | None:
    """Install `sink` for every later `progress()` (None: show nothing); returns the sink it replaces."""
    old, _SINK[0] = _SINK[0], sink
    return old


def _ignore(n: int, info: str = "") -> None:
    return None


@contextmanager
def progress(label: str, total: int, show: bool = True, done: int = 0, unit: str = "") -> Iterator[Update]:
    """Yields update(n, info=""): n of `total` items are finished (counting from 0; `done` already were when
    this work started, e.g. on resume). `show=False`, or no sink installed, shows nothing."""
    sink = _SINK[0]
    if not show or sink is None or total <= done:
        yield _ignore
        return
    with sink(label, total, done, unit) as update:
        yield update
