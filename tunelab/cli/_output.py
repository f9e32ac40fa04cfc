"""What the CLI shows while work runs: tunelab's log messages, progress, and no third-party noise.

Library code logs to the "tunelab" logger hierarchy and reports progress through tunelab.progress; this module
installs how both look on stderr: a message per line (warnings yellow), a bar on a terminal and a plain line
every 5% or 30 s otherwise (logs, CI, pipes). Dependencies' warnings and progress bars are hidden unless
`--debug`. Text is never hard-wrapped (soft_wrap), so a printed path or command can be pasted whole.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from tunelab import progress as progress_mod

STYLES = {logging.WARNING: "yellow", logging.ERROR: "bold red", logging.CRITICAL: "bold red"}
# dependencies that log warnings at import or load time, or draw their own bars ("Skipping publisher trust
# check ...", "Failed to load CPU gemm_4bit_forward ...", transformers' "Loading weights" bar)
NOISY = ("transformers", "bitsandbytes", "kernels", "accelerate", "peft", "huggingface_hub", "torch")
_INSTALLED: dict = {}


class ConsoleHandler(logging.Handler):
    """Prints tunelab's log records as they looked when the library printed them: plain text, warnings in
    yellow, `extra={"style": "bold"}` for a headline and `extra={"rule": True}` for a section rule."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if getattr(record, "rule", False):
                self.console.rule(Text(msg, style="bold"))
                return
            style = getattr(record, "style", None) or STYLES.get(record.levelno, "")
            self.console.print(Text(msg, style=style), soft_wrap=True, highlight=False)
        except Exception:  # noqa: BLE001 - logging must never break the work it reports on
            self.handleError(record)


class _NotTunelab(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("tunelab")


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plain_lines(console: Console, seconds: float = 30.0):
    """A progress sink for output that is not a terminal: one line every 5% of the work and at least every
    `seconds`: 'LABEL N/TOTAL [UNIT] [INFO] elapsed H:MM:SS ETA H:MM:SS'."""

    @contextmanager
    def sink(label: str, total: int, done: int, unit: str) -> Iterator:
        every, t0 = max(1, total // 20), time.time()
        state = {"n": done, "printed": t0}

        def update(n: int, info: str = "") -> None:
            now = time.time()
            crossed = n // every > state["n"] // every
            if n > state["n"] and (crossed or n >= total or now - state["printed"] >= seconds):
                rate = (now - t0) / max(1, n - done)  # seconds per item in this process
                words = " ".join(w for w in (f"{label} {n}/{total}", unit, info) if w)
                console.print(f"{words} elapsed {hms(now - t0)} ETA {hms(rate * (total - n))}", markup=False,
                              highlight=False, soft_wrap=True)
                state["printed"] = now
            state["n"] = max(state["n"], n)

        yield update

    return sink


def bar(console: Console):
    """A progress sink for a terminal: a rich bar with the count, the latest info, elapsed time and ETA."""

    @contextmanager
    def sink(label: str, total: int, done: int, unit: str) -> Iterator:
        columns = (TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as p:
            tid = p.add_task(label, total=total, completed=done, info=unit)
            yield lambda n, info="": p.update(tid, completed=n, info=info or unit)

    return sink


def quiet_dependencies(debug: bool) -> None:
    """Hide dependencies' warnings and progress bars (shown with --debug). Environment variables cover what
    is imported later; loggers and already-imported libraries are switched directly."""
    if debug:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF conversion bar (tqdm reads it at import)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def install(debug: bool = False, console: Console | None = None) -> None:
    """Show tunelab's messages and progress on `console` (default: stderr); third-party log records only with
    `debug` (else they are dropped, not printed by Python's last-resort handler). Calling it again replaces
    what an earlier call installed."""
    uninstall()
    console = console or Console(stderr=True)
    quiet_dependencies(debug)
    handler = ConsoleHandler(console)
    tunelab_log = logging.getLogger("tunelab")
    tunelab_log.addHandler(handler)
    _INSTALLED.update(handler=handler, level=tunelab_log.level,
                      sink=progress_mod.set_sink(bar(console) if console.is_terminal else plain_lines(console)))
    tunelab_log.setLevel(logging.DEBUG if debug else logging.INFO)
    root = logging.getLogger()
    third = ConsoleHandler(console) if debug else logging.NullHandler()
    third.addFilter(_NotTunelab())
    root.addHandler(third)
    _INSTALLED["root"] = third
    levels = {}
    for name in NOISY:
        levels[name] = logging.getLogger(name).level
        logging.getLogger(name).setLevel(logging.WARNING if debug else logging.CRITICAL)
    _INSTALLED["levels"] = levels


def uninstall() -> None:
    """Undo `install` (tests use `showing()`, which calls both)."""
    if not _INSTALLED:
        return
    tunelab_log = logging.getLogger("tunelab")
    tunelab_log.removeHandler(_INSTALLED["handler"])
    tunelab_log.setLevel(_INSTALLED["level"])
    logging.getLogger().removeHandler(_INSTALLED["root"])
    for name, level in _INSTALLED["levels"].items():
        logging.getLogger(name).setLevel(level)
    progress_mod.set_sink(_INSTALLED["sink"])
    _INSTALLED.clear()


@contextmanager
def showing(console: Console | None = None, debug: bool = False) -> Iterator[Console]:
    """`install` for the length of a block (tests: what a library call shows under the CLI)."""
    console = console or Console(stderr=True)
    install(debug, console)
    try:
        yield console
    finally:
        uninstall()
