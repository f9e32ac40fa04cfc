"""Optimizer and learning-rate schedule from the recipe's train section."""

from __future__ import annotations

import math

import torch

from tunelab.config.recipe import TrainConfig
from tunelab.errors import TunelabError


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
    """AdamW (default), bitsandbytes 8-bit / paged AdamW, or SGD with momentum 0.9, over named parameters."""
    groups = param_groups(named, t, lora_plus_ratio)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunelabError(f"train.optimizer={t.optimizer} needs bitsandbytes: `pip install bitsandbytes`") from None
    if t.optimizer == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=t.betas)
    return bnb.optim.PagedAdamW(groups, lr=t.lr, betas=t.betas)


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
    warmup = int(round(t.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.schedule, warmup, total_steps))
