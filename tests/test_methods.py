"""The per-method table: one `MethodSpec` per method, read alike by the trainer, the estimator and the linter."""

import pytest

from tunelab.config.recipe import LoraConfig, QLoraConfig, Recipe
from tunelab.errors import TunelabError
from tunelab.models.methods import METHODS, apply_method, load_dtype, method_spec


def test_every_recipe_method_has_a_spec_and_unknown_ones_are_refused():
    allowed = set(Recipe.model_fields["method"].annotation.__args__)
    assert allowed == set(METHODS)
    with pytest.raises(TunelabError, match="lora, dora, qlora, prompt, full"):
        method_spec("lorax")


def test_load_dtype_rules():
    assert load_dtype(METHODS["lora"], "bf16") == "bf16"  # a frozen base in the compute dtype
    assert load_dtype(METHODS["dora"], "fp16") == "fp16"
    assert load_dtype(METHODS["full"], "bf16") == "fp32"  # fp32 master weights under autocast
    assert load_dtype(METHODS["qlora"], "bf16", QLoraConfig(compute_dtype="fp32")) == "fp32"
    assert [m for m, s in METHODS.items() if not s.supports_packing] == ["prompt"]
    assert [m for m, s in METHODS.items() if s.trains_base] == ["full"]


@pytest.mark.parametrize("method", ["lora", "dora", "prompt", "full"])
def test_apply_method_wraps_as_the_spec_says(tiny_llama, method):
    model, tok = tiny_llama
    spec = METHODS[method]
    model = apply_method(model, method, LoraConfig(r=4, alpha=8, targets="attention"), tokenizer=tok)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if spec.lora:
        assert names and all("lora_" in n for n in names)
        assert any("lora_magnitude_vector" in n for n in names) == spec.dora
    elif spec.prompt:
        assert len(names) == 1 and "prompt_encoder" in names[0]
    else:
        assert len(names) == len(list(model.parameters()))
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())  # fast paths are tunelab.fast's


def test_the_estimator_and_the_linter_read_the_table():
    from tunelab.memory import estimate
    from tunelab.memory.arch import arch_from_config
    from tunelab.models import tiny_config
    from tunelab.plan import lint

    arch = arch_from_config(tiny_config("llama", vocab_size=512), name="tiny")
    by = {m: estimate(arch, method=m, seq=64, device="cpu") for m in METHODS}
    assert by["dora"].bytes == by["lora"].bytes  # DoRA is estimated as LoRA
    assert by["full"].params_trainable == arch.params_total
    assert by["qlora"].bytes["weights"] < by["lora"].bytes["weights"]
    dora = lint(Recipe.model_validate({"method": "dora", "train": {"lr": 1e-2}}))
    assert any(f.code == "lr-range" and "LoRA" in f.message for f in dora)  # the LoRA range, from the table
    full = lint(Recipe.model_validate({"method": "full", "train": {"lr": 1e-2}}))
    assert any(f.code == "lr-range" and "1e-05..5e-05" in f.message for f in full)
