"""A SwiGLU MLP's activation and down projection as one autograd function that keeps 2 activations, not 5.

`down_proj(silu(gate) * up)` as autograd ops keeps gate, silu(gate), up and the product h (the down
projection's input); a LoRA on down_proj keeps h (and PEFT a dropped-out copy of it). Here backward
recomputes silu(gate) and h from gate and up, elementwise passes that cost ~1% of a step, so the MLP keeps
two (tokens, intermediate) tensors where it kept four or five: on the bundled model that is ~6 KB per token
per layer, ~20% of a LoRA step's activations. The arithmetic is torch's (the same ops forward; backward
uses aten's silu_backward), so values and gradients are bit-identical. No library fuses this on a CPU, so it
is written here.

`use_fused_mlp(model)` swaps the class of every Llama-style MLP (Llama, Mistral, Qwen2/3, SmolLM3) whose
activation is SiLU; its forward takes the fused path only while gradients are on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.fast.lora import compute_dtype, lora_backward, lora_forward
from tunelab.fast.swap import swap_forward

KNOWN = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP")


def _swiglu_backward(gh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                     silu: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients at gate and up of h = silu(gate) * up, as autograd's mul and silu backward compute them
    (`silu`: silu(gate) when the caller has it already)."""
    return torch.ops.aten.silu_backward(gh * up, gate), gh * (F.silu(gate) if silu is None else silu)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only (the down projection is not a fused LoRA)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, gh):
        return _swiglu_backward(gh, *ctx.saved_tensors)


class _SwiGLULora(torch.autograd.Function):
    """down(silu(gate) * up) with a LoRA on down: `_LoraLinear` whose input is recomputed, never kept."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling: float, p: float):
        # gate, up (..., inter) -> (..., d)
        shape = gate.shape
        dt = compute_dtype(gate)
        gate2, up2 = gate.reshape(-1, shape[-1]).to(dt), up.reshape(-1, shape[-1]).to(dt)  # (T, inter)
        out, saved = lora_forward(ctx, F.silu(gate2) * up2, weight, bias, lora_a, lora_b, scaling, p)
        ctx.save_for_backward(gate2, up2, *saved)
        ctx.shape, ctx.dtypes_in = shape, (gate.dtype, up.dtype)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        gate2, up2, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        silu = F.silu(gate2)  # (T, inter)
        h = silu * up2  # (T, inter): the forward's value again
        gh, gbias, ga, gb = lora_backward(ctx, grad.reshape(-1, grad.shape[-1]), h, *saved,
                                          need[0] or need[1], need[3], need[4], need[5])
        del h
        ggate = gup = None
        if gh is not None:
            ggate, gup = _swiglu_backward(gh, gate2, up2, silu)
            ggate = ggate.view(ctx.shape).to(ctx.dtypes_in[0])
            gup = gup.view(ctx.shape).to(ctx.dtypes_in[1])
        return ggate, gup, None, gbias, ga, gb, None, None


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or type(self.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        return type(self).__mro__[1].forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    fused = down.fused_args() if hasattr(down, "fused_args") else None
    if fused is None:
        return down(_SwiGLU.apply(gate, up))
    return _SwiGLULora.apply(gate, up, *fused)


def use_fused_mlp(model: torch.nn.Module) -> int:
    """Give every known SwiGLU MLP in `model` the fused forward (a subclass, same state); returns how many."""
    return swap_forward(model, KNOWN, ("gate_proj", "up_proj", "down_proj"), _fused_forward)
