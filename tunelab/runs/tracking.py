"""Mirror a finished training run to MLflow (recipe `report_to: [mlflow]`): params, metrics, data, adapter.

MLflow is where many teams already look; the registry stays the source of truth for lineage. mlflow is
imported only here, and only when a recipe asks for it (`pip install tunelab[tracking]`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

from tunelab.errors import TunelabError
from tunelab.runs import layout

EXPERIMENT = "tunelab"
# the files of a run folder that make up the adapter an MLflow user downloads (checkpoints are left out)
ADAPTER_FILES = (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS, layout.MODEL_WEIGHTS, "config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
RUN_FILES = (layout.RUN_JSON, layout.RECIPE_YAML, layout.TRAIN_LOG, layout.LEGACY_TRAIN_LOG, layout.LOSS_PNG)
LOGGED_METRICS = ("loss", "val_loss", "lr", "tokens_per_s")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def _artifact_location(uri: str) -> str | None:
    """For a local sqlite:/// store, keep artifacts next to the database (not in the working directory)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def mirror_to_mlflow(folder: str | Path, tracking_uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Log a run folder to MLflow: the recipe as params, the training log as per-step metrics, the final
    metrics, each dataset's sha256 as a dataset input, and the adapter files as artifacts. Returns the run id."""
    try:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag, Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TunelabError("the recipe says report_to: [mlflow] but mlflow is not installed: "
                           "pip install 'tunelab[tracking]' (or remove report_to).") from None
    folder = Path(folder)
    info = layout.read_run_json(folder)
    recipe = info.get("recipe") or {}
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, _artifact_location(uri))
    tags = {"tunelab.folder": str(folder.resolve()), "tunelab.method": str(info.get("method")),
            "tunelab.base_model": str((info.get("base_model") or {}).get("spec")),
            "tunelab.base_model_hash": str((info.get("base_model") or {}).get("hash"))}
    run_id = client.create_run(exp_id, run_name=folder.name, tags=tags).info.run_id
    try:
        digests = {f"dataset.{role}.sha256": src.get("sha256") for role, src in (info.get("data") or {}).items()}
        params = [Param(k, v) for k, v in {**flatten(recipe), **flatten(digests)}.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[i:i + 100])
        now_ms = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), now_ms, int(row["step"])) for row in layout.read_train_log(folder)
                   for k in LOGGED_METRICS if isinstance(row.get(k), (int, float))]
        final = info.get("metrics") or {}
        steps = int(final.get("steps") or 0)
        metrics += [Metric(f"final_{k}", float(v), now_ms, steps) for k, v in final.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        inputs = []
        for role, src in (info.get("data") or {}).items():
            ds = MetaDataset(LocalArtifactDatasetSource(str(src.get("path"))), name=role, digest=src["sha256"][:36])
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", role)]))
        if inputs:
            client.log_inputs(run_id, datasets=inputs)
        for name in ADAPTER_FILES:
            if (folder / name).is_file():
                client.log_artifact(run_id, str(folder / name), "adapter")
        for name in RUN_FILES:
            if (folder / name).is_file():
                client.log_artifact(run_id, str(folder / name), "run")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
