"""Bring your own data, a few rows of it (issue 27.2): the README's example trains with the defaults, the log
says how the batch was fitted, the linter does not ask for a batch the data cannot fill, and `data check` says
beforehand what the defaults will do."""

import json
import logging

import pytest
from conftest import single_thread

from tunelab.config.recipe import Recipe, load_recipe

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
README_ROWS = [  # README.md, "Bring your own data"
    {"messages": [{"role": "user", "content": "Ada wants 3 apples."},
                  {"role": "assistant", "content": "{\"name\": \"Ada\", \"qty\": 3}"}]},
    {"messages": [{"role": "user", "content": "Two pears for Bob, please."},
                  {"role": "assistant", "content": "{\"name\": \"Bob\", \"qty\": 2}"}]},
]


@pytest.fixture()
def readme_data(tmp_path):
    path = tmp_path / "my-data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in README_ROWS))
    return path


def test_the_readme_example_trains_with_the_defaults_and_says_how(readme_data, tiny_model_dir, tmp_path, caplog):
    """`tunelab train data.task=null data.train=my-data/train.jsonl train.max_steps=10`: 1 row held out, 1 to
    train on; the default effective batch of 8 does not fit, so the batch is fitted (and the log says so)."""
    from tunelab.train import train

    recipe = load_recipe(None, [f"model.spec={tiny_model_dir}", "data.task=null", f"data.train={readme_data}",
                                "train.max_steps=10", f"output_dir={tmp_path / 'mine'}", "train.precision=fp32"])
    assert recipe.train.batch_size * recipe.accumulation() == 8  # the defaults
    with caplog.at_level(logging.INFO, logger="tunelab"):
        out = train(recipe, show_progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["metrics"]["steps"] == 10
    assert (out / "adapter_model.safetensors").is_file()
    said = caplog.text
    assert "small data: 1 training sequence(s)" in said and "batch_size=1 grad_accum=1" in said, said
    assert "below the recommended 64" not in said and "batch-small" not in said  # no contradictory advice
    saved = load_recipe(out / "recipe.yaml")
    assert (saved.train.batch_size, saved.train.grad_accum) == (1, 1)  # the run folder records what ran


def test_fit_to_data_shrinks_the_batch_then_the_accumulation():
    r = load_recipe(None, ["train.batch_size=4", "train.effective_batch=16"])  # 4 x 4
    assert r.fit_to_data(16) == (r, None) and r.fit_to_data(100)[1] is None
    fitted, note = r.fit_to_data(10)
    assert (fitted.train.batch_size, fitted.accumulation()) == (4, 2) and "10 training sequence(s)" in note
    fitted, _ = r.fit_to_data(3)
    assert (fitted.train.batch_size, fitted.accumulation()) == (3, 1)
    fitted, _ = r.fit_to_data(5, processes=2)  # 2 per process, one step of 2 x 1 x 2 = 4
    assert (fitted.train.batch_size, fitted.accumulation(2)) == (2, 1)
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="each process needs at least one"):
        r.fit_to_data(1, processes=2)


def test_lint_asks_for_a_larger_batch_only_when_the_data_can_fill_it(readme_data, tmp_path):
    from tunelab.plan import lint

    small = Recipe.model_validate({"data": {"task": None, "train": str(readme_data)}})
    assert not {"batch-small", "batch-unstable"} & {f.code for f in lint(small)}
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(README_ROWS[i % 2]) + "\n" for i in range(200)))
    large = Recipe.model_validate({"data": {"task": None, "train": str(big)}})
    assert "batch-small" in {f.code for f in lint(large)}  # 190 rows can fill the recommended 64


def test_data_check_says_what_the_defaults_will_do(readme_data, tokenizer, tunelab, tmp_path):
    from tunelab.data import check_file

    report = check_file(readme_data, tokenizer)
    assert report.training.startswith("1 row(s) held out for validation; 1 training row(s) -> 1 sequence(s)")
    assert "small data" in report.training and "batch_size=1 grad_accum=1" in report.training
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(README_ROWS[i % 2]) + "\n" for i in range(400)))
    assert "optimizer step(s) per epoch" in check_file(big, tokenizer).training
    code, out, err = tunelab("data", "check", readme_data, "--json")
    assert code == 0, err
    assert "small data" in json.loads(out)["training"]
