"""Train and eval register what they write: a 2-step tiny run + eval, `tunelab runs ...`, and the MLflow mirror."""

import json

import pytest
from conftest import single_thread
from typer.testing import CliRunner

from tunelab import cli
from tunelab.config.recipe import load_recipe
from tunelab.models import identity
from tunelab.runs import layout, lineage, roots
from tunelab.runs.layout import file_sha256

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, chat_file):
    """One tiny LoRA run (2 steps, mirrored to a local MLflow store) and an eval of base + adapter on it."""
    from tunelab.evaluate.harness import evaluate_task
    from tunelab.train import train

    root = tmp_path_factory.mktemp("runs-workflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_REGISTRY", str(root / "registry.sqlite"))
        recipe = load_recipe(None, [
            f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={chat_file}", f"output_dir={root / 'run'}",
            "train.max_steps=2", "train.batch_size=2", "train.effective_batch=2", "train.max_length=128",
            "eval.every=1", "checkpoint_every=null", "lora.r=4", "train.precision=fp32", "report_to=[mlflow]",
            f"mlflow_tracking_uri=sqlite:///{root / 'mlflow.db'}",
        ])
        out = train(recipe, show_progress=False)
        evaluate_task("orders-json", model=str(tiny_model_dir), adapters=[out], limit=2, out=root / "eval",
                      batch_size=4)
        yield {"root": root, "run": out, "recipe": recipe}


def _cli(*args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_run_folder_files_are_named_apart(trained):
    run = trained["run"]
    assert (run / layout.TRAIN_LOG).is_file() and not (run / layout.LEGACY_TRAIN_LOG).exists()
    assert [r["step"] for r in layout.read_train_log(run) if "loss" in r] == [1, 2]
    assert (run / layout.RUN_JSON).is_file() and (run / layout.RECIPE_YAML).is_file()
    assert (trained["root"] / "eval" / "base" / layout.EVAL_METRICS).is_file()


def test_lineage_walks_from_adapter_to_base_data_and_recipe(trained, tiny_model_dir, chat_file):
    run = trained["run"]
    tree = json.loads(_cli("runs", "lineage", run, "--json"))
    assert tree["kind"] == "adapter" and tree["path"] == str(run.resolve())
    assert tree["hash"] == file_sha256(run / layout.ADAPTER_WEIGHTS)
    ends = roots(tree)
    assert [b["hash"] for b in ends["base_model"]] == [identity(str(tiny_model_dir))["hash"]]
    train_data = [d for d in ends["dataset"] if d["role"] == "train"]
    assert [d["hash"] for d in train_data] == [file_sha256(chat_file)]
    assert [r["path"] for r in ends["recipe"]] == [str(run.resolve() / layout.RECIPE_YAML)]
    assert "adapter" in _cli("runs", "lineage", run) and "base_model" in _cli("runs", "lineage", run)


def test_evals_are_registered_with_what_they_used(trained, tiny_model_dir):
    evals = json.loads(_cli("runs", "list", "--kind", "eval", "--json"))
    assert len(evals) == 2 and {e["task"] for e in evals} == {"orders-json"}
    adapter_eval = next(e for e in evals if e["path"] == str((trained["root"] / "eval" / "run").resolve()))
    tree = lineage(adapter_eval["id"])
    by_role = {p["role"]: p for p in tree["parents"]}
    assert by_role["adapter"]["path"] == str(trained["run"].resolve())
    assert by_role["base_model"]["hash"] == identity(str(tiny_model_dir))["hash"]
    from tunelab.tasks import load_task

    test_split = load_task("orders-json").split_path("test")
    assert by_role["dataset"]["hash"] == file_sha256(test_split)
    assert by_role["system_prompt"]["kind"] == "prompt"
    table = _cli("runs", "compare", *[e["id"] for e in evals])
    assert "json_exact" in table and "field_f1" in table
    shown = json.loads(_cli("runs", "show", adapter_eval["id"], "--json"))
    assert shown["meta"]["n"] == 2 and {p["role"] for p in shown["made_from"]} >= {"adapter", "dataset"}


def test_depends_on_the_base_lists_the_adapter(trained, tiny_model_dir):
    got = json.loads(_cli("runs", "depends-on", tiny_model_dir, "--json"))
    assert [(a["kind"], a["path"]) for a in got["artifacts"]] == [("adapter", str(trained["run"].resolve()))]
    with_evals = json.loads(_cli("runs", "depends-on", tiny_model_dir, "--all", "--json"))
    assert {a["kind"] for a in with_evals["artifacts"]} == {"run", "adapter", "eval"}


def test_mlflow_gets_params_metrics_dataset_and_adapter(trained, chat_file):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained['root'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tunelab")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == str(trained["recipe"].train.lr)
    assert run.data.params["lora.r"] == "4" and run.data.params["dataset.train.sha256"] == file_sha256(chat_file)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2]
    logged = {r["step"]: r["loss"] for r in layout.read_train_log(trained["run"]) if "loss" in r}
    assert {m.step: m.value for m in losses} == pytest.approx(logged)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 1, 2]
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests["train"] == file_sha256(chat_file)[:36]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= files
    local = client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(trained["root"]))
    assert file_sha256(local) == file_sha256(trained["run"] / layout.ADAPTER_WEIGHTS)
    assert str(trained["root"]) in run.info.artifact_uri  # kept next to the database, not in the cwd
