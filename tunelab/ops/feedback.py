"""Feedback out of the request log into MLflow (`tunelab feedback export --mlflow`): each rated response becomes
an MLflow trace (its GenAI attributes; prompt and answer when they were logged) carrying the feedback as MLflow
assessments (score or label with the comment as rationale; a correction as an expectation). Exporting again
adds only what is new."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.ops.requestlog import RequestLog, attributes

EXPERIMENT = "tunelab-feedback"
INSTALL = "pip install 'tunelab[tracking]'"


@dataclass
class ExportResult:
    tracking_uri: str
    experiment_id: str
    traces: int  # traces created (responses not exported before)
    assessments: int  # feedback and corrections logged
    skipped: int  # feedback already exported


def _mlflow():
    try:
        import mlflow
        from mlflow.entities import AssessmentSource, Expectation, Feedback

        return mlflow, AssessmentSource, Expectation, Feedback
    except ImportError:
        raise TunelabError(f"`tunelab feedback export --mlflow` needs MLflow, which is not installed: {INSTALL} "
                           "(the full package: mlflow-skinny has no SQL store).") from None


def export_mlflow(log: RequestLog, tracking_uri: str | None = None, experiment: str = EXPERIMENT, *,
                  tenant: str | None = None, since: float | None = None) -> ExportResult:
    """Write the log's feedback (of `tenant`, given after `since`) to MLflow as assessments on one trace per
    rated response. tracking_uri: default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    mlflow, Source, Expectation, Feedback = _mlflow()
    from mlflow.tracing.client import TracingClient
    from mlflow.tracking import MlflowClient

    from tunelab.runs.tracking import _artifact_location

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    mlflow.set_tracking_uri(uri)  # traces go where the tracer is pointed: the process's tracking URI
    client, tracing = MlflowClient(tracking_uri=uri), TracingClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, _artifact_location(uri))
    known = _exported(client, exp_id)  # response id -> (trace id, feedback keys already logged)
    items = log.feedback(tenant=tenant, since=since)
    traces = assessments = skipped = 0
    for rid in dict.fromkeys(f["response_id"] for f in items):
        if rid not in known:
            known[rid] = (_trace(client, log.get(rid), exp_id), set())
            traces += 1
    if traces:
        mlflow.flush_trace_async_logging()  # the traces must be stored before assessments can name them
    for fb in items:
        trace_id, done = known[fb["response_id"]]
        key = f"{fb['ts']:.6f}"
        if key in done:
            skipped += 1
            continue
        source = Source(source_type="HUMAN", source_id=fb["tenant"])
        meta = {"tunelab.feedback_ts": key, "gen_ai.evaluation.score.label": fb["label"] or ""}
        tracing.log_assessment(trace_id, Feedback(name=fb["name"], value=fb["score"] if fb["score"] is not None
                                                  else fb["label"], source=source, rationale=fb["explanation"],
                                                  metadata=meta))
        assessments += 1
        if fb["correction"]:
            tracing.log_assessment(trace_id, Expectation(name="correction", value=fb["correction"],
                                                         source=source, metadata=meta))
            assessments += 1
    return ExportResult(uri, exp_id, traces, assessments, skipped)


def _trace(client, row, exp_id: str) -> str:
    """An MLflow trace for one logged response (its GenAI attributes, prompt and answer); its id."""
    attrs = {k: str(v) for k, v in attributes(row).items()}
    start = int(row.ts * 1e9)
    span = client.start_trace(f"{attrs['gen_ai.operation.name']} {row.model}", inputs={"prompt": row.prompt},
                              attributes=attrs, tags={"tunelab.response_id": row.response_id,
                                                      "tunelab.tenant": row.tenant},
                              experiment_id=exp_id, start_time_ns=start)
    client.end_trace(span.trace_id, outputs={"answer": row.answer}, end_time_ns=start + int(row.latency_s * 1e9))
    return span.trace_id


def _exported(client, exp_id: str) -> dict[str, tuple[str, set[str]]]:
    """The traces an earlier export made in the experiment, by response id, with the feedback they carry."""
    out, token = {}, None
    while True:
        page = client.search_traces(locations=[exp_id], max_results=500, page_token=token,
                                    include_spans=False)
        for t in page:
            rid = t.info.tags.get("tunelab.response_id")
            if rid:
                keys = {(a.metadata or {}).get("tunelab.feedback_ts") for a in t.info.assessments or []}
                out[rid] = (t.info.trace_id, keys)
        token = page.token
        if not token:
            return out
