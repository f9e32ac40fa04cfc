"""The optimizer factory and learning-rate schedule, shared by the trainer and the memory measurement.

One vocabulary (`train.optimizer`): adamw (torch), adamw_8bit and paged_adamw (bitsandbytes), sgd (SGD with
momentum 0.9: one state per parameter). `STATES` says how many values per parameter each one keeps.
"""

from __future__ import annotations

import math

import torch

from tunelab.config.recipe import TrainConfig
from tunelab.errors import TunelabError

STATES = {"adamw": 2, "adamw_8bit": 2, "paged_adamw": 2, "sgd": 1}  # optimizer values per trainable parameter
SGD_MOMENTUM = 0.9


def make_optimizer(params: list, name: str = "adamw", lr: float = 1e-4,
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """An optimizer by its `train.optimizer` name over `params` (parameters or param groups)."""
    if name not in STATES:
        raise TunelabError(f"unknown optimizer {name!r}: use one of {', '.join(STATES)} (train.optimizer).")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunelabError(f"train.optimizer={name} needs bitsandbytes: `pip install bitsandbytes`") from None
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return bnb.optim.PagedAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def param_groups(named: list[tuple[str, torch.nn.Parameter]], t: TrainConfig,
                 lora_plus_ratio: float | None = None) -> list[dict]:
    """Weight decay on matrices only; with `lora_plus_ratio` (LoRA+, Hayou et al. 2024) the LoRA B matrices
    learn at ratio x lr. PEFT's `create_loraplus_optimizer` builds the optimizer itself; this keeps one
    builder for every optimizer choice, so the grouping is written here."""
    def is_b(name: str) -> bool:
        return lora_plus_ratio is not None and ".lora_B." in name

    groups = [
        {"params": [p for n, p in named if p.ndim >= 2 and not is_b(n)], "weight_decay": t.weight_decay},
        {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0},
        {"params": [p for n, p in named if p.ndim >= 2 and is_b(n)], "weight_decay": t.weight_decay,
         "lr": t.lr * (lora_plus_ratio or 1.0)},  # empty unless a ratio is given
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(named: list[tuple[str, torch.nn.Parameter]], t: TrainConfig,
                    lora_plus_ratio: float | None = None) -> torch.optim.Optimizer:
    """`train.optimizer` over named parameters, grouped by `param_groups`."""
    return make_optimizer(param_groups(named, t, lora_plus_ratio), t.optimizer, t.lr, t.betas)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at each optimizer step: linear warmup, then cosine/linear/constant."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(opt: torch.optim.Optimizer, t: TrainConfig, total_steps: int):
    """`train.schedule` with `train.warmup_ratio` of `total_steps` as linear warmup."""
    warmup = int(round(t.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.schedule, warmup, total_steps))
