"""data.mix: several datasets in one recipe, sampled by weight (seeded) and recorded in run.json."""

import json

import pytest

from tunelab.config.recipe import load_recipe
from tunelab.data.mix import mix_counts, sample_mix
from tunelab.errors import TunelabError
from tunelab.tasks import load_task
from tunelab.train.dataset import load_conversations


@pytest.fixture(scope="module")
def other_file(tmp_path_factory):
    """40 rows of another skill (saying a colour), to mix with the conftest chat_file."""
    path = tmp_path_factory.mktemp("other") / "other.jsonl"
    colours = ["red", "green", "blue", "amber", "violet"]
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Which colour is item {i}?"},
        {"role": "assistant", "content": colours[i % 5]}]}) + "\n" for i in range(40)))
    return path


def test_mix_counts_keep_the_shares_and_never_repeat_a_row():
    assert mix_counts([1000, 300], [0.8, 0.2]) == [1000, 250]
    assert mix_counts([100, 1000], [0.8, 0.2]) == [100, 25]
    assert mix_counts([50, 50, 50], [1, 1, 2]) == [25, 25, 50]
    with pytest.raises(TunelabError, match="no training rows"):
        mix_counts([10, 0], [1, 1])


def test_sample_mix_is_seeded():
    a, b = list(range(100)), list(range(100, 130))
    first = sample_mix([a, b], [3, 1], seed=0)
    assert first.rows == sample_mix([a, b], [3, 1], seed=0).rows
    assert first.rows != sample_mix([a, b], [3, 1], seed=1).rows
    assert len(set(first.rows)) == len(first.rows) == 120 and sum(r >= 100 for r in first.rows) == 30


def _mix(*sources, extra=()):
    return load_recipe(None, ["data.mix=" + json.dumps(list(sources)), *extra])


def test_a_task_and_a_file_mix_by_weight(chat_file):
    recipe = _mix({"task": "orders-json", "weight": 0.8}, {"path": str(chat_file), "weight": 0.2})
    assert recipe.data.task is None
    train, val, sources = load_conversations(recipe.data, seed=0)
    system = load_task("orders-json").spec.system_prompt.strip()
    from_task = sum(r[0]["content"] == system for r in train)
    # chat_file: 64 rows - 3 carved off for validation = 61, all used; orders-json gives 4 x 61
    assert (from_task, len(train) - from_task) == (244, 61)
    assert sources["train[0]"]["task"] == "orders-json" and sources["train[0]"]["weight"] == 0.8
    assert sources["train[1]"]["rows_used"] == 61 and sources["train[0]"]["rows_available"] == 1000
    assert sources["train[0]"]["mix_seed"] == 0 and sources["train[0]"]["rows_used_sha256"]
    assert "validation[0]" in sources and "validation[1]" not in sources  # carved off train[1]'s file
    assert len(val) == 64  # data.limit_validation, over both datasets' validation rows shuffled together
    assert any(r[0]["content"] == system for r in val) and not all(r[0]["content"] == system for r in val)
    again = load_conversations(recipe.data, seed=0)[0]
    assert again == train and load_conversations(recipe.data, seed=1)[0] != train


@pytest.mark.parametrize("extra,match", [
    (["data.train=x.jsonl"], "data.mix replaces data.train"),
    (["data.task=orders-json"], "data.mix replaces data.task"),
])
def test_mix_replaces_the_single_source_keys(extra, match):
    with pytest.raises(TunelabError, match=match):
        _mix({"task": "orders-json", "weight": 1}, extra=extra)


def test_a_mix_entry_names_one_source():
    with pytest.raises(TunelabError, match="exactly one of task: or path:"):
        _mix({"task": "orders-json", "path": "x.jsonl", "weight": 1})
    with pytest.raises(TunelabError, match="weight"):
        _mix({"task": "orders-json", "weight": 0})


def test_training_on_a_mix_records_it_in_run_json(tiny_model_dir, chat_file, other_file, tmp_path):
    from tunelab.train import train

    recipe = _mix({"path": str(chat_file), "weight": 3}, {"path": str(other_file), "weight": 1}, extra=[
        f"model.spec={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
        "train.batch_size=2", "train.effective_batch=2", "train.max_length=128", "train.precision=fp32",
        "validation.every=null", "checkpoint_every=null", "lora.r=4", "lora.alpha=4"])
    out = train(recipe, show_progress=False)
    run = json.loads((out / "run.json").read_text())
    first, second = run["data"]["train[0]"], run["data"]["train[1]"]
    assert (first["weight"], second["weight"]) == (3, 1)
    assert (first["rows_used"], second["rows_used"]) == (61, 20)  # 61 and 38 rows after validation: 3:1
    assert first["path"] == str(chat_file) and first["sha256"] and first["mix_seed"] == 0
    assert run["recipe"]["data"]["mix"][1]["path"] == str(other_file)
