"""RMSNorm as one autograd function: saves the input and one scale per token instead of fp32 copies.

Llama-style `RMSNorm.forward` (`weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`) runs as
six autograd ops. In bf16 each keeps its own activation (an fp32 copy of the input among them) and backward
walks them all again. Here forward saves the bf16 input and the (tokens, 1) fp32 reciprocal RMS, and backward
uses the closed form d/dx = rstd * (g' - n * mean(g' * n)), with g' = g * weight and n the normalised input.
The arithmetic (fp32 statistics, a round to the input dtype before the weight) is HF's, so outputs are
bit-identical. transformers' hub kernels need a download and a GPU, so this is written here.

`use_fused_norm(model)` swaps the class of every RMSNorm whose forward is exactly that formula (Llama,
Mistral, Qwen2/3, SmolLM); others (Gemma's `1 + weight`, ...) are left alone.
"""

from __future__ import annotations

import torch

from tunelab.fast.swap import swap_forward

# Norm classes whose forward is weight * normalise(x).to(x.dtype) with fp32 statistics, and their eps attribute
KNOWN = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm", "Phi3RMSNorm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # (..., d): fp32 statistics (fp64 stays fp64)
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)  # (..., 1)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd  # (..., d): the normalised input, fp32
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gn = (grad * weight).to(rstd.dtype)  # the gradient at the normalised input
            gx = (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (grad * n.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        return gx, gw, None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).__mro__[1].forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, float(self.variance_epsilon))


def use_fused_norm(model: torch.nn.Module) -> int:
    """Give every known RMSNorm in `model` the fused forward (a subclass, same state); returns how many."""
    return swap_forward(model, KNOWN, ("variance_epsilon",), _fused_forward)
