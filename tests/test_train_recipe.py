"""The trainer reads top to bottom: short functions, early stopping that stops, fast paths off end to end."""

import ast
import json
from pathlib import Path

from tunelab.config.recipe import load_recipe
from tunelab.train import train

TRAIN = Path(__file__).resolve().parents[1] / "tunelab" / "train"


def _long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > limit]


def test_no_trainer_function_is_over_80_lines(tmp_path):
    long = [f for path in sorted(TRAIN.glob("*.py")) for f in _long_functions(path, 80)]
    assert not long, long
    planted = tmp_path / "long.py"
    planted.write_text("def f():\n" + "    x = 1\n" * 85)
    assert _long_functions(planted, 80) == ["long.py:f (86 lines)"]


def _recipe(model_dir, data, out, *extra):
    return load_recipe(None, [
        f"model.spec={model_dir}", "data.task=null", f"data.train={data}", f"output_dir={out}",
        "train.batch_size=2", "train.effective_batch=2", "train.max_length=96", "train.precision=fp32",
        "checkpoint_every=null", "data.validation_fraction=0.1", *extra])


def test_early_stopping_stops_at_the_validation_that_decides_it(tiny_model_dir, chat_file, tmp_path):
    """A learning rate that wrecks the model: validation gets worse, patience 1 stops at the second check."""
    out = train(_recipe(tiny_model_dir, chat_file, tmp_path / "run", "train.max_steps=12", "train.lr=0.5",
                        "train.optimizer=sgd", "train.grad_clip=null", "validation.every=2",
                        "validation.patience=1", "method=full"), show_progress=False)
    run = json.loads((out / "run.json").read_text())
    log = next(p for p in (out / "train_log.jsonl", out / "metrics.jsonl") if p.exists())  # renamed elsewhere
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert run["metrics"]["stopped_early"] is True
    stop = run["metrics"]["steps"]
    assert stop < 12 and stop % 2 == 0 and vals[-1][0] == stop  # stopped right at a validation
    assert max(r["step"] for r in rows if "loss" in r) == stop  # and trained no further
    assert vals[-1][1] >= min(v for _, v in vals[:-1]) - 1e-4  # which had not improved


def test_fast_paths_off_trains_end_to_end(tiny_model_dir, chat_file, tmp_path):
    out = train(_recipe(tiny_model_dir, chat_file, tmp_path / "off", "train.max_steps=3", "train.fast_paths=off",
                        "validation.every=null", "train.precision=bf16"), show_progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["metrics"]["steps"] == 3 and run["metrics"]["fast_paths"] is False
    assert (out / "adapter_model.safetensors").exists()
