"""Build the model a recipe trains: compute and load dtypes, 4-bit layers for QLoRA, the method applied.

The trainer (`tunelab.train`) and the memory measurement (`tunelab.memory.measure`) both build through
here, so what is measured is what trains. Per-method rules come from `tunelab.models.methods.METHODS`.
"""

from __future__ import annotations

import tempfile

import torch

from tunelab.config.recipe import QLoraConfig, Recipe
from tunelab.models.dtypes import DTYPES, compute_dtype
from tunelab.models.load import load_model
from tunelab.models.methods import apply_method, bnb_config, load_dtype, method_spec


def apply_recipe_method(model, recipe: Recipe, tokenizer=None):
    """`apply_method` with the recipe's method, its LoRA / prompt sections and train switches."""
    t = recipe.train
    return apply_method(model, recipe.method, recipe.lora, recipe.prompt, tokenizer, t.grad_checkpointing,
                        t.freeze_embeddings)


def build_model(recipe: Recipe, device: str) -> tuple[torch.nn.Module, object, torch.dtype]:
    """Load the base model in the method's dtype and wrap it for the method; -> (model, tokenizer, compute dtype).

    Compute runs in `train.precision` (auto: bf16 where fast), under autocast when that is 16-bit; full
    finetuning keeps fp32 master weights, PEFT methods a frozen base in the compute dtype, QLoRA 4-bit
    linears with the rest upcast to fp32 by k-bit preparation.
    """
    spec = method_spec(recipe.method)
    compute = compute_dtype(recipe.train.precision, device)
    quant = bnb_config(recipe.qlora) if spec.quantized else None
    m = recipe.model
    model, tok = load_model(m.spec, dtype=load_dtype(spec, compute, recipe.qlora), quantization_config=quant,
                            device=None if quant is not None else device, chat_template=m.chat_template,
                            rope_scaling=m.rope_scaling.model_dump() if m.rope_scaling else None)
    model = apply_recipe_method(model, recipe, tok)
    if compute != "fp32":  # training runs under autocast: no need for PEFT to upcast LoRA inputs to the
        for module in model.modules():  # fp32 adapter dtype (a copy of every adapter input, forward and back)
            if hasattr(module, "lora_A"):
                module.cast_input_dtype_enabled = False
    return model, tok, DTYPES[compute]


def quantize(model, qlora: QLoraConfig | None = None):
    """Reload an in-memory model with 4-bit linear layers (QLoRA's; saves it to a temporary folder first)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="tunelab-q-") as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb_config(qlora or QLoraConfig()),
                                                    device_map="cpu")
