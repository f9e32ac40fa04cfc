"""The Typer app, its console and the options several subcommands share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tunelab.cli import _output
from tunelab.cli.eval_tables import fitted_console

app = typer.Typer(help="tunelab: decide whether to finetune, with numbers; then train, evaluate, ship.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Inspect training data files, or make them with a teacher (distill).", no_args_is_help=True)
app.add_typer(data_app, name="data")
out = fitted_console()  # 80 columns when stdout is not a terminal
STATE = {"debug": False}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="bundled alias, HF folder, .gguf file or hub id")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")]
TemplateOpt = Annotated[str | None, typer.Option(
    "--chat-template", help="a .jinja file replacing the model's chat template, or chatml (for base models)")]
RagOpt = Annotated[Path | None, typer.Option("--rag", help="retrieval index: put its top passages in the prompt")]
KOpt = Annotated[int | None, typer.Option("-k", help="passages to retrieve (default: the index's k)")]
LoadInOpt = Annotated[str | None, typer.Option(
    "--load-in", help="8bit|4bit: the base's linear layers in bitsandbytes int8 / NF4 (default: unquantized)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks, and dependencies' warnings "
                                                            "and progress bars")] = False) -> None:
    STATE["debug"] = debug
    _output.install(debug)  # tunelab's messages and progress on stderr


def say(text: str) -> None:
    """Print plain text (a result's summary) on stdout, never hard-wrapped: a path or command in it stays on
    one line, so it can be pasted."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def _print_json(obj) -> None:
    out.print_json(json.dumps(obj, default=str))

