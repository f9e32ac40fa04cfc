"""The `tunelab` command line: a dispatch table where each subcommand calls one library function."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from tunelab.cli import _output, core, decide, feedback, loop, ops, rag, runs, ship, ui  # noqa: F401  (each registers its subcommands)
from tunelab.cli._app import STATE, app
from tunelab.errors import TunelabError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: run the app, turning TunelabError into a one-paragraph message and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _output.quiet_dependencies("--debug" in sys.argv[1:])  # before any dependency is imported
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(N) returns N when not standalone
            sys.exit(code)
    except TunelabError as e:
        if STATE["debug"]:
            raise
        # soft_wrap: the terminal wraps the paragraph, so a long file:line is never cut in two
        Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if STATE["debug"]:
            raise
        Console(stderr=True).print(f"[bold red]error:[/bold red] {type(e).__name__}: {escape(str(e))} (rerun with --debug "
                                   "for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)
