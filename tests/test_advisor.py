"""`tunelab plan`: method, batch/accumulation, checkpointing, memory and the recipe it writes."""

import pytest

from tunelab.config.recipe import Recipe
from tunelab.errors import TunelabError
from tunelab.memory.units import GiB
from tunelab.plan.advisor import plan


def test_llama_8b_on_24gb_with_5000_examples():
    p = plan("meta-llama/Llama-3.1-8B", "24GB", examples=5000, goal="format")
    assert p.finetune and p.fits
    assert p.method == "lora"  # 16 GB of bf16 weights leave room for LoRA with checkpointing
    assert p.grad_ckpt and 1 <= p.batch <= 8
    assert p.effective_batch >= 64
    assert p.estimate.bytes["total"] <= 24 * GiB
    assert p.hyper["lr"] == 2e-4 and p.hyper["lora_r"] == 32 and p.hyper["epochs"] == 3
    assert all(reason for _, reason in p.reasons)
    assert p.epoch_hours is not None and 0 < p.epoch_hours < 24
    assert p.to_json()["effective_batch"] == p.effective_batch


def test_plan_writes_a_recipe_train_accepts(tmp_path):
    p = plan("meta-llama/Llama-3.1-8B", "24GB", examples=5000)
    train = tmp_path / "train.jsonl"
    r = p.to_recipe(train_file=str(train))
    assert isinstance(r, Recipe)
    assert r.method == "lora" and r.data.train == str(train) and r.data.task is None
    assert r.train.batch_size * r.accumulation() == p.effective_batch >= 64
    assert r.train.grad_checkpointing == p.grad_ckpt and r.train.precision == "bf16"
    Recipe.model_validate(r.model_dump())  # round-trips through the schema


def test_knowledge_goal_points_to_rag():
    p = plan("meta-llama/Llama-3.1-8B", "24GB", goal="knowledge")
    assert not p.finetune and "RAG" in p.reasons[0][0]
    with pytest.raises(TunelabError, match="RAG"):
        p.to_recipe()


def test_large_model_on_small_gpu_falls_back_to_qlora():
    p = plan("Qwen/Qwen2.5-14B", "24GB", examples=5000)
    assert p.method == "qlora" and p.fits
    assert p.hyper["optimizer"] == "paged_adamw"


def test_nothing_fits_is_said():
    p = plan("meta-llama/Llama-3.1-70B", "16GB", examples=5000)
    assert not p.fits and any("DOES NOT FIT" in c for c, _ in p.reasons)


def test_distillation_with_enough_data_and_hardware_goes_full():
    p = plan("Qwen/Qwen2.5-0.5B", "80GB", examples=20_000, goal="distill")
    assert p.method == "full" and p.hyper["lr"] == 2e-5


def test_small_style_data_uses_soft_prompts():
    p = plan("Qwen/Qwen2.5-0.5B", "24GB", examples=500, goal="style")
    assert p.method == "prompt"


def test_more_gpus_need_less_accumulation():
    one = plan("Qwen/Qwen2.5-1.5B", "24GB", examples=5000)
    four = plan("Qwen/Qwen2.5-1.5B", "24GB", examples=5000, gpus=4)
    assert four.effective_batch >= 64 and four.grad_accum < one.grad_accum
    assert four.epoch_hours < one.epoch_hours
