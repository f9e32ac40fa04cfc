"""Every shipped YAML loads: training recipes through the recipe schema, accelerate configs through accelerate."""

from pathlib import Path

import pytest

from tunelab.config.recipe import load_recipe
from tunelab.errors import TunelabError
from tunelab.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "accelerate").glob("*.yaml"))


def test_the_shipped_files_are_there():
    from tunelab.tasks import list_tasks

    trainable = [t.name for t in list_tasks() if t.kind not in ("regression", "safety")]  # those two measure harm
    assert set(trainable) >= {"orders-json", "shop-sql", "handbook-qa"}
    assert {p.name for p in RECIPES} >= {f"{t}-{m}.yaml" for t in trainable for m in ("lora", "qlora", "prompt", "full")}
    assert {p.name for p in ACCELERATE} >= {"single_gpu.yaml", "ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml",
                                            "deepspeed_zero3.yaml", "cpu_ddp.yaml"}
    guide = (ROOT / "docs" / "training.md").read_text()  # the README links its table of configs
    assert "docs/training.md#distributed-training" in (ROOT / "README.md").read_text()
    for p in ACCELERATE:
        assert f"accelerate/{p.name}" in guide, f"docs/training.md does not mention accelerate/{p.name}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads(path):
    recipe = load_recipe(path)
    method = path.stem.rsplit("-", 1)[-1]  # orders-json-qlora.yaml -> qlora
    assert recipe.method == method
    assert recipe.data.task is not None and load_task(recipe.data.task).name == recipe.data.task
    assert path.stem.startswith(recipe.data.task)
    if method in ("lora", "qlora"):
        assert recipe.lora.target_modules()
    assert recipe.output_dir.startswith("runs/")
    assert recipe.accumulation() >= 1


def test_shipped_recipes_use_the_validation_key_and_the_old_eval_key_still_loads(tmp_path):
    for p in RECIPES:
        text = p.read_text()
        assert "\neval:" not in text and "\nvalidation:" in text, p.name
    old = tmp_path / "old.yaml"
    old.write_text((ROOT / "recipes" / "orders-json-lora.yaml").read_text().replace("\nvalidation:", "\neval:"))
    with pytest.warns(FutureWarning, match="`eval:` is now `validation:`"):
        recipe = load_recipe(old)
    assert recipe == load_recipe(ROOT / "recipes" / "orders-json-lora.yaml")
    with pytest.warns(FutureWarning):  # an old-style override too
        assert load_recipe(None, ["eval.every=7"]).validation.every == 7
    both = tmp_path / "both.yaml"
    both.write_text(old.read_text() + "validation: {every: 3}\n")
    with pytest.raises(TunelabError, match="validation"):
        load_recipe(both)


def test_recipe_output_dirs_differ():
    dirs = [load_recipe(p).output_dir for p in RECIPES]
    assert len(set(dirs)) == len(dirs)


def test_a_typo_in_a_shipped_recipe_would_fail(tmp_path):
    """The loader above really validates: the same file with one misspelt key is refused."""
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "recipes" / "orders-json-lora.yaml").read_text().replace("epochs:", "epoch:", 1))
    assert broken.read_text() != (ROOT / "recipes" / "orders-json-lora.yaml").read_text()
    with pytest.raises(TunelabError, match="unknown key 'train.epoch'.*did you mean 'epochs'"):
        load_recipe(broken)


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    assert cfg.num_machines == 1 and cfg.num_processes >= 1
    expected = {"single_gpu": DistributedType.NO, "ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
                "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}
    if path.stem in expected:  # cpu_ddp launches through torchrun (see its header), so its type is free
        assert cfg.distributed_type == expected[path.stem] and cfg.use_cpu is False
    if path.stem == "cpu_ddp":
        assert cfg.num_processes == 2
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if cfg.distributed_type == DistributedType.FSDP:
        assert cfg.fsdp_config["fsdp_version"] == 2


def test_accelerate_loader_rejects_unknown_keys(tmp_path):
    """The loader above really validates: an unknown top-level key is refused."""
    from accelerate.commands.config.config_args import load_config_from_file

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "accelerate" / "ddp.yaml").read_text() + "num_gpus_typo: 2\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(bad))
