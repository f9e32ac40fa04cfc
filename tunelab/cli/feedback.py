"""`tunelab feedback export`: the feedback users gave on logged responses (POST /v1/feedback), out to MLflow."""

from __future__ import annotations

from typing import Annotated

import typer

from tunelab.cli._app import app, say
from tunelab.errors import TunelabError

feedback_app = typer.Typer(help="Feedback on served responses (POST /v1/feedback), from the request log.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def export(
    mlflow: Annotated[bool, typer.Option("--mlflow", help="write it as MLflow assessments (tunelab[tracking])")]
    = False,
    log: Annotated[str | None, typer.Option(help="the request log: a SQLite file or postgresql:// URL (default: "
                                                 "requests.sqlite beside the registry, as `tunelab serve`)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                          "else sqlite:///mlflow.db)")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "tunelab-feedback",
    tenant: Annotated[str | None, typer.Option(help="only this tenant's feedback")] = None,
) -> None:
    """Export the feedback in the request log: one MLflow trace per rated response, the scores and labels as
    feedback assessments, corrections as expectations. Run it again to add only what is new."""
    if not mlflow:
        raise TunelabError("tunelab feedback export: say where to: --mlflow (MLflow assessments).")
    from tunelab.ops.feedback import export_mlflow
    from tunelab.ops.requestlog import RequestLog

    store = RequestLog.open(log)
    try:
        res = export_mlflow(store, tracking_uri, experiment, tenant=tenant)
    finally:
        store.close()
    say(f"{res.assessments} assessment(s) written, {res.traces} new trace(s), {res.skipped} already there: "
        f"{res.tracking_uri} (experiment {experiment}, id {res.experiment_id})")
