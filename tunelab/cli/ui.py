"""`tunelab ui`: the web UI on its own (`tunelab serve --ui` mounts the same pages into a server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.cli._app import app, say
from tunelab.errors import TunelabError


def rag_indexes(items: list[str] | None) -> dict[str, str]:
    """NAME=DIR options as {name: folder}."""
    indexes = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise TunelabError(f"--rag-index {item!r}: write NAME=DIR, e.g. handbook=runs/idx-handbook.")
        indexes[name] = folder
    return indexes


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="address to listen on; anything but loopback needs --keys")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
    keys: Annotated[Path | None, typer.Option(help="keys.yaml: an admin key logs in to everything, a tenant's "
                                                     "key to its own adapters and logs (docs/serving.md)")] = None,
    runs_dir: Annotated[Path, typer.Option(help="where runs started from the Train page go")] = Path("runs"),
    model: Annotated[str | None, typer.Option("--model", "-m", help="the playground's base model (loaded on "
                                                                    "first use)")] = None,
    adapters: Annotated[Path | None, typer.Option(help="the playground's adapters: a folder of adapter "
                                                       "folders")] = None,
    rag_index: Annotated[list[str] | None, typer.Option(help="NAME=DIR: a retrieval index for the playground "
                                                             "(repeatable)")] = None,
    log: Annotated[str | None, typer.Option(help="the request log the Serve, Review and Monitor pages read "
                                                 "(default: requests.sqlite beside the registry)")] = None,
) -> None:
    """The web UI: runs, training with a live loss chart, evals side by side, a playground, serving."""
    from tunelab.ui import serve_ui

    say(f"tunelab ui on http://{host}:{port}/ui (Ctrl-C stops it; training started from it goes on)")
    serve_ui(host, port, keys, runs_dir, model, adapters, rag_indexes(rag_index), log)
