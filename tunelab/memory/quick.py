"""The guide's back-of-envelope memory math, and the `accelerate estimate-memory` formula to compare with.

These are the rules of thumb the estimator improves on; they stay here so the CLI can show them for a
model known only by its size (`--params 13B`) and so the bench can print them next to measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9  # the guide's examples use decimal gigabytes
OPTIMIZER_VALUES = {"sgd": 0, "momentum": 1, "adamw": 2, "adamw_8bit": 2, "paged_adamw": 2}


@dataclass(frozen=True)
class QuickMath:
    """The guide's rules of thumb for a model of `params` parameters."""

    params: int
    bytes_per_param: float
    weights: int  # N x M
    inference: int  # N x M x 1.2 (activations + KV cache ~ 20% of weights)
    trainable: int
    gradients_and_states: int  # trainable x (1 gradient + optimizer values) x M

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        """Human-readable lines with the guide's arithmetic spelled out."""
        n, m = self.params, self.bytes_per_param
        return [
            f"weights: {n / 1e9:g}B params x {m:g} bytes = {self.weights / GB:,.1f} GB",
            f"inference (x1.2 rule of thumb: activations + KV cache ~20%): {self.inference / GB:,.1f} GB",
            f"gradients + optimizer states for {self.trainable / 1e9:g}B trainable params: "
            f"{self.gradients_and_states / GB:,.1f} GB (activations not included)",
        ]


def quick_math(params: int, bytes_per_param: float = 2, trainable: int | None = None,
               optimizer: str = "adamw", rule_of_thumb: float = 1.2) -> QuickMath:
    """Memory ~ N x M x 1.2 for inference; each trainable parameter adds 1 gradient + 0-2 optimizer values.

    params: parameter count N. bytes_per_param: M (2 for 16-bit). trainable: trainable parameters
    (default: all). optimizer: sgd (0 states), momentum (1), adamw (2).
    """
    trainable = params if trainable is None else trainable
    weights = int(params * bytes_per_param)
    per_trainable = (1 + OPTIMIZER_VALUES[optimizer]) * bytes_per_param
    return QuickMath(params=params, bytes_per_param=bytes_per_param, weights=weights,
                     inference=int(round(weights * rule_of_thumb)), trainable=trainable,
                     gradients_and_states=int(trainable * per_trainable))


def lora_matrix_params(n: int, m: int, r: int) -> int:
    """Trainable parameters LoRA adds to one n x m matrix: A (n x r) and B (r x m)."""
    return r * (n + m)


def adapter_serving(base_params: int, adapter_params: int, tenants: int) -> dict[str, int]:
    """Parameters stored to serve `tenants` finetunes: one base + adapters, or one merged copy each."""
    return {"separate_adapters": base_params + tenants * adapter_params, "merged_copies": tenants * base_params}


def accelerate_training_bytes(params: int, precision: str = "bf16") -> int:
    """`accelerate estimate-memory`'s training figure (`estimate_training_usage`): weights, gradients
    and Adam states only. fp32: 4 x the fp32 weights (16 bytes/param); mixed precision: fp32 master
    weights, fp32+fp16 gradients and 2 fp32 states, of which it reports the largest, 2 x the fp32
    weights (8 bytes/param). No activations, sequence length, LoRA or quantization.
    """
    fp32 = params * 4
    if precision == "fp32":
        return 4 * fp32
    sizes = {"model": fp32, "gradients": fp32 + fp32 // 2, "optimizer": 2 * fp32, "step": 2 * fp32}
    return max(sizes.values())
