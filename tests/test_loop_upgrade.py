"""tunelab upgrade: every adapter on BASE retrained on NEW from its recipe, compared side by side, one report."""

import pytest
import yaml

from tunelab.errors import TunelabError
from tunelab.ops.upgrade import recommend, upgrade
from tunelab.runs import layout, record_training_run


def _run(folder, base: str, task: str | None):
    folder.mkdir(parents=True, exist_ok=True)
    layout.write_json(folder / "adapter_config.json", {"peft_type": "LORA"})
    (folder / "adapter_model.safetensors").write_bytes(folder.name.encode())
    layout.write_json(folder / "run.json", {"base_model": {"spec": base}, "method": "lora", "data": {}})
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"model": {"spec": base}, "data": {"task": task},
                                                        "output_dir": str(folder)}))


def test_upgrade_retrains_each_dependent_and_recommends(tmp_path, monkeypatch, tunelab):
    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry.sqlite"))
    for name, task in (("orders", "orders-json"), ("sql", "shop-sql"), ("raw", None)):
        _run(tmp_path / "runs" / name, "old-base", task)
        record_training_run(tmp_path / "runs" / name)
    _run(tmp_path / "runs" / "other", "another-base", "orders-json")
    record_training_run(tmp_path / "runs" / "other")
    trained = []

    def trainer(recipe_path, overrides):
        recipe = yaml.safe_load(recipe_path.read_text())
        trained.append((recipe["model"]["spec"], recipe["data"]["task"]))
        return layout.Path(recipe["output_dir"])

    def evaluator(task, base, adapter, out_dir, limit):
        better = base == "new-base" and task == "orders-json"
        return "m", ([1.0] * 20 if better else [0.5] * 20) if task == "orders-json" else [1.0, 0.0] * 10

    report = upgrade("old-base", "new-base", tmp_path / "up", trainer=trainer, evaluator=evaluator)
    assert sorted(trained) == [("new-base", "orders-json"), ("new-base", "shop-sql")]  # not `other`, not `raw`
    by = {layout.Path(r["adapter"]).name: r for r in report["adapters"]}
    assert set(by) == {"orders", "sql", "raw"} and "skipped" in by["raw"]
    assert by["orders"]["recommendation"] == "switch" and by["orders"]["change"]["delta_points"] == 50.0
    assert by["sql"]["recommendation"] == "either"
    assert "| orders | orders-json | m | 20 | 0.500 | 1.000 | +50.0" in (tmp_path / "up" / "upgrade.md").read_text()
    again = upgrade("old-base", "new-base", tmp_path / "up", trainer=trainer, evaluator=evaluator)
    assert len(trained) == 2 and again["adapters"] == report["adapters"]  # a rerun retrains nothing done
    with pytest.raises(TunelabError, match="no base model"):
        upgrade("missing-base", "new-base", tmp_path / "up2", trainer=trainer, evaluator=evaluator)


def test_recommendation_follows_the_ci():
    assert recommend({"ci95_points": [1.0, 5.0]}) == "switch"
    assert recommend({"ci95_points": [-5.0, -1.0]}) == "keep"
    assert recommend({"ci95_points": [-1.0, 5.0]}) == "either"


@pytest.mark.slow  # two tiny bases: one training and two small evals
def test_upgrade_between_two_tiny_bases_for_real(tmp_path, monkeypatch, tiny_model_dir, untied_dir, tunelab):
    from tunelab.config.recipe import load_recipe
    from tunelab.train import train

    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry.sqlite"))
    train(load_recipe(None, [f"model.spec={tiny_model_dir}", "data.task=orders-json", "data.limit_train=16",
                             "data.limit_validation=2", "train.max_steps=1", "validation.every=null", "lora.r=2",
                             f"output_dir={tmp_path / 'orders'}"]), show_progress=False)
    code, out, err = tunelab("upgrade", "--from", tiny_model_dir, "--to", untied_dir, "--out", tmp_path / "up",
                             "--limit", "2", "--set", "train.max_steps=1")
    assert code == 0, err
    assert "orders (orders-json, field_f1, n=2)" in out and "report:" in out
    assert (tmp_path / "up" / "orders" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "up" / "upgrade.md").is_file()
