"""The per-method table: one `MethodSpec` per method, read alike by the trainer, the estimator and the linter."""

import pytest
import torch

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
    from tunelab.config.recipe import TrainConfig
    from tunelab.memory import estimate
    from tunelab.memory.arch import arch_from_config
    from tunelab.models import tiny_config
    from tunelab.plan import lint

    arch = arch_from_config(tiny_config("llama", vocab_size=512), name="tiny")
    by = {m: estimate(arch, m, TrainConfig(max_length=64), device="cpu") for m in METHODS}
    assert by["dora"].bytes == by["lora"].bytes  # DoRA is estimated as LoRA
    assert by["full"].params_trainable == arch.params_total
    assert by["qlora"].bytes["weights"] < by["lora"].bytes["weights"]
    dora = lint(Recipe.model_validate({"method": "dora", "train": {"lr": 1e-2}}))
    assert any(f.code == "lr-range" and "0.0001..0.0003 for DoRA" in f.message for f in dora)  # from the table
    full = lint(Recipe.model_validate({"method": "full", "train": {"lr": 1e-2}}))
    assert any(f.code == "lr-range" and "1e-05..5e-05" in f.message for f in full)


def test_qlora_trains_nf4_linears_with_the_gradients_of_the_dequantized_model(tiny_model_dir):
    """QLoRA's LoRA gradients equal LoRA's on the dequantized weights, also after a no-grad eval forward
    (validation): on a CPU with AVX512-BF16 that forward used to repack bitsandbytes' 4-bit weights for
    `gemv_4bit`, which has no backward, and every later training step lost the gradient through them."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_model
    from tunelab.models.methods import bnb_config

    cfg = LoraConfig(r=4, alpha=8, dropout=0.0)
    base, _ = load_model(str(tiny_model_dir), dtype="fp32", quantization_config=bnb_config(QLoraConfig(compute_dtype="fp32")))
    q = apply_method(base, "qlora", cfg)
    four_bit = {n: m for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all(m.weight.quant_state.quant_type == "nf4" for m in four_bit.values())
    lora_layers = [m for m in q.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_layers)
    torch.manual_seed(0)
    q_params = dict(q.named_parameters())
    for n, p in q_params.items():
        if "lora_B" in n:  # B = 0 would give A no gradient
            torch.nn.init.normal_(p, std=0.05)
    ref = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), "lora", cfg)
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for n, m in four_bit.items():
            ref_modules[n].weight.copy_(dequantize_4bit(m.weight.data, m.weight.quant_state).float())
        for n, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(q_params[n])
    x = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    q.eval()
    with torch.no_grad():
        q(input_ids=x)  # what validation runs
    losses = {}
    for name, model in (("qlora", q), ("dequantized", ref)):
        model.train()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        losses[name] = loss.item()
    assert losses["qlora"] == pytest.approx(losses["dequantized"], rel=1e-5)
    trained = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    assert trained and all(q_params[n].grad is not None for n, _ in trained)
    for n, p in trained:
        assert torch.allclose(q_params[n].grad, p.grad, rtol=1e-3, atol=1e-7), n


def test_plan_and_lint_take_learning_rates_and_advice_from_the_table(monkeypatch):
    """`tunelab plan`'s method reason and learning rate and the linter's fix are METHODS' (no restated copies)."""
    from dataclasses import replace

    from tunelab.models import methods
    from tunelab.plan import lint, plan

    monkeypatch.setitem(methods.METHODS, "lora", replace(methods.METHODS["lora"], default_lr=1.5e-4,
                                                          advice="LoRA for {examples} examples", lr_advice="why"))
    p = plan("HuggingFaceTB/SmolLM2-135M", "24GB", examples=500)
    assert p.method == "lora" and p.hyper["lr"] == 1.5e-4
    assert ("method: lora", "LoRA for 500 examples") in p.reasons
    assert any(c.startswith("lr 0.00015") and r.startswith("why") for c, r in p.reasons)
    f = next(f for f in lint(Recipe.model_validate({"train": {"lr": 1e-2}})) if f.code == "lr-range")
    assert f.fix == "set train.lr=0.00015." and f.reason == "why"
