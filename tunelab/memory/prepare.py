"""Set up the model and optimizer a recipe trains, the way `tunelab train` does, for measuring a step.

The method is applied by `tunelab.models.methods.apply_method` and its load dtype read from the same
`METHODS` table as the trainer: compute in `train.precision` (auto: bf16 where fast), under autocast when
that is 16-bit; full finetuning keeps fp32 master weights, PEFT methods a frozen base in the compute
dtype, QLoRA 4-bit linears with the rest upcast to fp32 by k-bit preparation. The estimator models PEFT's
and transformers' own ops; `measure.measure` swaps in the trainer's CPU fast paths (tunelab.fast) where
`train.fast_paths` turns them on, since that is what `tunelab train` would run.
"""

from __future__ import annotations

import tempfile

import torch

from tunelab.config.recipe import Recipe
from tunelab.errors import TunelabError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# tunelab train's "sgd" is SGD with momentum 0.9 (one state per parameter)
TRAINER_OPTIMIZER = {"adamw": "adamw", "adamw_8bit": "adamw_8bit", "paged_adamw": "paged_adamw", "sgd": "momentum"}


def train_dtype(recipe: Recipe, device: str = "cpu") -> str:
    """The compute dtype: `train.precision`, with `auto` resolved for `device` (bf16 where fast)."""
    if recipe.train.precision != "auto":
        return recipe.train.precision
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "bf16"  # planning a GPU run from another machine: current GPUs run bf16
    from tunelab.models import bf16_supported

    return "bf16" if bf16_supported(device) else "fp32"


def load_dtype(recipe: Recipe, compute: str) -> str:
    """The dtype the trainer loads weights in for a compute dtype (see the module docstring)."""
    from tunelab.models.methods import load_dtype as method_load_dtype
    from tunelab.models.methods import method_spec

    return method_load_dtype(method_spec(recipe.method), compute, recipe.qlora)


def bnb_config(recipe: Recipe):
    """The bitsandbytes 4-bit config of a QLoRA recipe."""
    from tunelab.models.methods import bnb_config as trainer_bnb_config

    return trainer_bnb_config(recipe.qlora)


def quantize(model, recipe: Recipe):
    """Reload an in-memory model with 4-bit linear layers (saves it to a temporary folder first)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="tunelab-q-") as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb_config(recipe), device_map="cpu")


def apply_method(model, recipe: Recipe, tokenizer=None):
    """Apply the recipe's method and gradient checkpointing with the trainer's own code: PEFT's and
    transformers' modules (not the fused ones of `tunelab.fast.enable`, which keep less), but for LoRA's
    dropout, which keeps a 1-byte mask as CUDA's dropout does: torch's CPU dropout keeps a 4-byte one."""
    from tunelab.fast.dropout import use_fast_dropout
    from tunelab.models.methods import apply_method as trainer_apply_method

    t = recipe.train
    model = trainer_apply_method(model, recipe.method, recipe.lora, recipe.prompt, tokenizer,
                                 t.grad_checkpointing, t.freeze_embeddings)
    use_fast_dropout(model)
    return model


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float = 1e-4,
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.01):
    """An optimizer by the estimator's names: adamw | adamw_8bit | paged_adamw (bitsandbytes) | sgd |
    momentum (SGD with momentum 0.9)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name in ("sgd", "momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "momentum" else 0.0,
                               weight_decay=weight_decay)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "paged_adamw":
        return bnb.optim.PagedAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise TunelabError(f"unknown optimizer {name!r}: use adamw, adamw_8bit, paged_adamw, sgd or momentum")
