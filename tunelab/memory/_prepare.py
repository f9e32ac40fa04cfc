"""Build the model a recipe trains (method applied) and its optimizer, for measuring a real step.

Uses `tunelab.models.prepare_for_training` when it exists, so the measurement sees what `tunelab
train` trains; otherwise applies the method with PEFT the way the guide's code does (LoRA via
`get_peft_model`; QLoRA via bitsandbytes 4-bit + `prepare_model_for_kbit_training`).
"""

from __future__ import annotations

import tempfile

import torch

from tunelab.config.recipe import Recipe
from tunelab.errors import TunelabError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def train_dtype(recipe: Recipe, device: str = "cpu") -> str:
    """The dtype weights and activations train in: `train.precision`, with `auto` resolved for `device`."""
    if recipe.train.precision != "auto":
        return recipe.train.precision
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "bf16"  # planning a GPU run from another machine: current GPUs run bf16
    from tunelab.models import bf16_supported

    return "bf16" if bf16_supported(device) else "fp32"


def bnb_config(recipe: Recipe):
    """The bitsandbytes 4-bit config of a QLoRA recipe."""
    from transformers import BitsAndBytesConfig

    q = recipe.qlora
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[q.compute_dtype])


def quantize(model, recipe: Recipe):
    """Reload an in-memory model with 4-bit linear layers (saves it to a temporary folder first)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="tunelab-q-") as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb_config(recipe), device_map="cpu")


def apply_method(model, recipe: Recipe):
    """Apply the recipe's method (and gradient checkpointing) to a loaded model; returns the model."""
    try:
        from tunelab.models import prepare_for_training
    except ImportError:
        prepare_for_training = None
    if prepare_for_training is not None:
        return prepare_for_training(model, recipe)
    return _apply_with_peft(model, recipe)


def _apply_with_peft(model, recipe: Recipe):
    import peft

    ckpt = recipe.train.grad_checkpointing
    model.config.use_cache = False
    if recipe.method == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(not (recipe.train.freeze_embeddings and "embed" in name))
        if ckpt:
            model.gradient_checkpointing_enable()
        return model
    if recipe.method == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:
        model.gradient_checkpointing_enable()
    if recipe.method in ("lora", "qlora"):
        lc = recipe.lora
        cfg = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                              target_modules=lc.target_modules(), use_dora=lc.use_dora, task_type="CAUSAL_LM")
    elif recipe.method == "prompt":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=recipe.prompt.num_virtual_tokens)
    else:
        raise TunelabError(f"unknown method {recipe.method!r}")
    return peft.get_peft_model(model, cfg)


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float = 1e-4,
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.01):
    """The optimizer a recipe names: adamw | adamw_8bit | paged_adamw (bitsandbytes) | sgd | momentum."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "paged_adamw":
        return bnb.optim.PagedAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise TunelabError(f"unknown optimizer {name!r}: use adamw, adamw_8bit, paged_adamw, sgd or momentum")
