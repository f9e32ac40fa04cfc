"""`tunelab plan`: whether to finetune, which method, which hyperparameters, and will it fit.

Every choice carries its reason from the guide (shared/finetuning-reference.md). Memory comes from
`estimate`; time per epoch from training FLOPs (6N per token for full finetuning, 4N when the base is
frozen, +2N with gradient checkpointing, plus attention) at a stated fraction of the GPU's bf16 peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from tunelab.config.recipe import TrainConfig
from tunelab.memory.arch import Arch
from tunelab.memory.catalog import model_arch
from tunelab.memory.estimate import MemoryEstimate, estimate
from tunelab.memory.units import GiB, gib, parse_bytes
from tunelab.models.methods import method_spec

Goal = Literal["format", "style", "knowledge", "distill"]

# (GPU class for a memory size, dense bf16 TFLOP/s) -- a rented card of that size, for a rough time
GPU_CLASS = [(16, "T4 (fp16)", 65), (24, "A10 / L4", 121), (40, "A100 40GB", 312), (48, "L40S", 362),
             (80, "A100 80GB", 312), (96, "H100 NVL", 835), (141, "H200", 989)]
MFU = 0.4  # fraction of peak a finetuning run typically sustains
HEADROOM = 0.95  # leave 5% of the card for allocator fragmentation
BATCHES = (8, 4, 2, 1)  # the guide: per device 1-8
EFFECTIVE = 64  # the guide: accumulate to an effective batch of 64 or more


@dataclass
class FinetunePlan:
    """A recommendation; `reasons` pairs each choice with the guide's reason."""

    model: str
    finetune: bool
    method: str | None = None
    reasons: list[tuple[str, str]] = field(default_factory=list)
    hyper: dict = field(default_factory=dict)
    batch: int = 0
    grad_accum: int = 0
    gpus: int = 1
    grad_ckpt: bool = False
    seq: int = 0
    estimate: MemoryEstimate | None = None
    gpu: str = ""
    gpu_memory: int = 0
    epoch_hours: float | None = None
    steps_per_epoch: int = 0
    fits: bool = True

    @property
    def effective_batch(self) -> int:
        return self.batch * self.grad_accum * self.gpus

    def to_json(self) -> dict:
        return {"model": self.model, "finetune": self.finetune, "method": self.method, "fits": self.fits,
                "reasons": [{"choice": c, "reason": r} for c, r in self.reasons], "hyperparameters": self.hyper,
                "batch": self.batch, "grad_accum": self.grad_accum, "gpus": self.gpus,
                "effective_batch": self.effective_batch, "grad_checkpointing": self.grad_ckpt, "seq": self.seq,
                "memory": self.estimate.to_json() if self.estimate else None, "gpu": self.gpu,
                "epoch_hours": self.epoch_hours, "steps_per_epoch": self.steps_per_epoch}

    def to_recipe(self, train_file: str | None = None, validation_file: str | None = None):
        """The plan as a `Recipe` that `tunelab train` accepts (data: the given JSONL files)."""
        from tunelab.config.recipe import Recipe
        from tunelab.errors import TunelabError

        if not self.finetune:
            raise TunelabError("the plan recommends not finetuning (knowledge goal: use RAG), so there is "
                               "no training recipe to write; rerun with --goal format|style|distill.")
        h = self.hyper
        data = {"train": train_file, "validation": validation_file, "task": None} if train_file else {}
        return Recipe.model_validate({
            "model": {"spec": self.model, "dtype": "checkpoint"},
            "data": data,
            "method": self.method,
            "lora": {"r": h.get("lora_r", 32), "alpha": h.get("lora_alpha", 32),
                     "dropout": h.get("lora_dropout", 0.05), "targets": "attention+mlp"},
            "train": {"epochs": h["epochs"], "lr": h["lr"], "schedule": "cosine", "warmup_ratio": 0.03,
                      "weight_decay": 0.01, "batch_size": self.batch, "grad_accum": self.grad_accum,
                      "effective_batch": self.effective_batch, "max_length": self.seq, "packing": True,
                      "grad_checkpointing": self.grad_ckpt, "precision": "bf16", "optimizer": h["optimizer"]},
        })


def _gpu_class(memory: int) -> tuple[str, float]:
    for gb, name, tflops in GPU_CLASS:
        if memory <= gb * GiB * 1.02:
            return name, tflops
    return GPU_CLASS[-1][1], GPU_CLASS[-1][2]


def _estimate(a: Arch, method: str, seq: int, batch: int, ckpt: bool, gpus: int, optimizer: str):
    """The estimate of a step as `tunelab train` runs the plan: bf16 autocast, its chunked loss."""
    train = TrainConfig(max_length=seq, batch_size=batch, precision="bf16", optimizer=optimizer,
                        grad_checkpointing=ckpt)
    return estimate(a, method, train, autocast=True, loss="chunked", gpus=gpus,
                    zero=2 if gpus > 1 and method_spec(method).trains_base else 0)


def _fit(a: Arch, method: str, seq: int, budget: int, gpus: int, optimizer: str):
    """Largest per-device batch that fits, without checkpointing if possible: (batch, ckpt, estimate)."""
    for ckpt in (False, True):
        for batch in BATCHES:
            e = _estimate(a, method, seq, batch, ckpt, gpus, optimizer)
            if e.bytes["total"] <= budget:
                return batch, ckpt, e
    return None


def _epoch_hours(a: Arch, method: str, ckpt: bool, seq: int, tokens: int, gpus: int, tflops: float) -> float:
    n, spec = a.params_total, method_spec(method)
    per_token = (6 if spec.trains_base else 4) * n + (2 * n if ckpt else 0)
    per_token += 6 * a.layers * seq * a.q_dim // 2  # causal attention scores and values, fwd + bwd
    # spec.speed: the guide says 4-bit dequantization slows training (QLoRA)
    return per_token * tokens / (tflops * 1e12 * MFU * spec.speed * gpus) / 3600


def plan(model: str, gpu_memory: str | int, *, gpus: int = 1, examples: int = 5000, goal: Goal = "format",
         seq: int | None = None, tokens_per_example: int = 512, tflops: float | None = None) -> FinetunePlan:
    """Recommend how to finetune `model` on `gpus` GPUs of `gpu_memory` each (e.g. "24GB").

    examples: training examples. goal: format | style | knowledge | distill. seq: max sequence length
    (default min(2048, context)). tokens_per_example: average length, for the time per epoch (packed).
    tflops: the GPU's dense bf16 TFLOP/s (default: a typical card of that memory size).
    """
    a = model_arch(model)
    memory = parse_bytes(gpu_memory)
    gpu, peak = _gpu_class(memory)
    p = FinetunePlan(model=model, finetune=goal != "knowledge", gpus=gpus, gpu=gpu, gpu_memory=memory)
    if not p.finetune:
        p.reasons.append(("do not finetune: add RAG", "Finetuning is for form; RAG is for facts. You need up-to-date "
                          "or private facts (use RAG); if both, start with RAG, then finetune if behaviour "
                          "issues remain."))
        return p
    p.reasons.append(("finetune", {"format": "Strict output formats (JSON/YAML/SQL/DSL) are what finetuning is "
                                             "for, after thorough prompt engineering.",
                                   "style": "Style and safety alignment is a finetuning job.",
                                   "distill": "Distill a large model into a small performant one for your task."}
                      [goal]))
    p.seq = seq or min(2048, a.context)
    budget = int(memory * HEADROOM)
    method, why = _choose_method(a, examples, goal, p.seq, budget, gpus)
    optimizer = method_spec(method).plan_optimizer
    fit = _fit(a, method, p.seq, budget, gpus, optimizer)
    if fit is None:  # nothing fits: report the smallest configuration and say so
        p.fits = False
        fit = (1, True, _estimate(a, method, p.seq, 1, True, gpus, optimizer))
    p.method = method
    p.batch, p.grad_ckpt, p.estimate = fit
    p.reasons.append((f"method: {method}", why))
    p.hyper = _hyperparameters(method, examples, optimizer)
    for choice, reason in p.hyper.pop("_reasons"):
        p.reasons.append((choice, reason))
    p.grad_accum = max(1, math.ceil(EFFECTIVE / (p.batch * gpus)))
    p.reasons.append((f"batch {p.batch} per device x {p.grad_accum} accumulation x {gpus} GPU = effective "
                      f"{p.effective_batch}", "Per device 1-8; use gradient accumulation to reach an effective "
                      "64-256. Very small batches (<8) can be unstable."))
    p.reasons.append((f"gradient checkpointing: {'on' if p.grad_ckpt else 'off'}",
                      "Activation memory can dwarf weights; checkpointing trades compute (~+33%) for memory."
                      if p.grad_ckpt else "Not needed: the step fits without it, and it costs ~33% more compute."))
    p.reasons.append((f"max length {p.seq}, packing on", "Use the max allowable length; pack short samples to "
                      "improve throughput."))
    total = p.estimate.bytes["total"]
    verdict = "fits" if p.fits else "DOES NOT FIT"
    p.reasons.append((f"memory: {gib(total)} of {gib(memory)} ({verdict})",
                      f"Weights {gib(p.estimate.bytes['weights'])}, activations "
                      f"{gib(p.estimate.bytes['activations'])}, logits {gib(p.estimate.bytes['logits'])}; "
                      f"peak at {p.estimate.peak}; as tunelab train runs it (bf16 autocast, chunked loss)."
                      + ("" if p.fits else " Use more GPUs, a smaller model, or QLoRA with a shorter max length.")))
    tokens = examples * tokens_per_example
    p.steps_per_epoch = math.ceil(tokens / p.seq / p.effective_batch)
    p.epoch_hours = _epoch_hours(a, method, p.grad_ckpt, p.seq, tokens, gpus, tflops or peak)
    p.reasons.append((f"time: ~{_hours(p.epoch_hours)} per epoch ({p.steps_per_epoch} optimizer steps)",
                      f"{examples:,} examples x {tokens_per_example} tokens; training FLOPs at {int(MFU * 100)}% "
                      f"of {tflops or peak:g} TFLOP/s ({'given' if tflops else gpu}). Rough."))
    return p


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _choose_method(a: Arch, examples: int, goal: str, seq: int, budget: int, gpus: int) -> tuple[str, str]:
    if goal == "style" and examples < 1000:
        method = "prompt"
    elif goal == "distill" and examples >= 10_000 and _fit(a, "full", seq, budget, gpus, "adamw"):
        method = "full"
    elif _fit(a, "lora", seq, budget, gpus, "adamw"):
        method = "lora"
    else:
        method = "qlora"
    return method, method_spec(method).advice.format(examples=examples)


def _hyperparameters(method: str, examples: int, optimizer: str) -> dict:
    epochs = 3
    h: dict = {"epochs": epochs, "optimizer": optimizer, "schedule": "cosine", "warmup_ratio": 0.03,
               "weight_decay": 0.01, "precision": "bf16"}
    reasons = []
    spec = method_spec(method)
    h["lr"] = spec.default_lr
    if spec.lora:
        h.update(lora_r=32, lora_alpha=32, lora_dropout=0.05, lora_targets="attention+mlp")
        reasons.append(("LoRA r=32, alpha=32, dropout 0.05 on attention + MLP projections",
                        "Recommended defaults: r 16-32 (8-64 suffices), alpha = r, dropout 0.0-0.1; including "
                        "the MLP layers often brings significant gains."))
    elif spec.prompt:
        h.update(num_virtual_tokens=20)
    reasons.append((f"{'20 virtual tokens, ' if spec.prompt else ''}lr {spec.default_lr:g}, cosine, 3% warmup",
                    f"{spec.lr_advice} Cosine schedule, warmup 1-5% of steps."))
    opt_reason = ("Paged AdamW (bitsandbytes) for QLoRA when VRAM is tight." if optimizer == "paged_adamw"
                  else "AdamW (beta1 0.9, beta2 0.95-0.999, weight decay 0.01).")
    reasons.append((f"optimizer {optimizer}, bf16", opt_reason + " Prefer BF16 where supported (fp16 on GPUs "
                    "without bf16, e.g. T4/V100)."))
    small = examples < 10_000
    reasons.append((f"{epochs} epochs, early stopping on validation loss",
                    "2-5 epochs for 10k-50k examples; monitor val loss and stop early to prevent overfitting"
                    + (f" (with {examples:,} examples, watch it closely)." if small else ".")))
    h["_reasons"] = reasons
    return h
