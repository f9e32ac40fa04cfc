"""One autograd function for a LoRA linear layer: base, dropout, A, B and scaling without full-size extra passes.

PEFT's `lora.Linear.forward` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops, so
each adapter adds three full-size elementwise passes forward (dropout, `* scaling`, `+`) and more backward,
and keeps the dropped-out input as an extra activation. Here the scaling is folded into B and the low-rank
product is accumulated into the base output with one `addmm`; backward does the same for the input
gradient. Only `x`, the dropout mask (as a 0/1 tensor in x's dtype) and the (tokens, r) low-rank activation are saved. The result is
the same function with the same parameters (tested against PEFT's forward and gradients), so adapters stay
plain PEFT adapters. PEFT has no fused path for this on CPU, so it is written here.

`use_fused_lora(model)` makes every PEFT `lora.Linear` use it when the plain case holds (one active
adapter, not merged, no DoRA, a dense base layer, gradients on); anything else takes PEFT's own forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tunelab.models.dropout import keep_mask_as


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        # x (..., d_in) · weight (d_out, d_in) · lora_a (r, d_in) · lora_b (d_out, r)
        shape, x_dtype = x.shape, x.dtype
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype  # what PEFT's ops would use
        x2 = x.reshape(-1, shape[-1]).to(dt)  # (T, d_in)
        a, b = lora_a.to(dt), (lora_b * scaling).to(dt)  # (r, d_in), (d_out, r): tiny casts
        keep = None
        if p > 0:  # inverted dropout: x * keep, with the 1 / (1 - p) applied to the (T, r) product
            keep = keep_mask_as(x2, p) if x.device.type == "cpu" else (torch.rand_like(x2) >= p).to(dt)
            xa = F.linear(x2 * keep, a).mul_(1.0 / (1.0 - p))  # (T, r)
        else:
            xa = F.linear(x2, a)  # (T, r)
        out = F.linear(x2, weight.to(dt), None if bias is None else bias.to(dt))  # (T, d_out)
        out.addmm_(xa, b.t())
        ctx.save_for_backward(x2, keep, xa, weight, a, b)
        ctx.scaling, ctx.p, ctx.shape, ctx.x_dtype = scaling, p, shape, x_dtype
        ctx.dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, keep, xa, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)  # (T, d_out)
        scale = 1.0 / (1.0 - ctx.p)
        gxa = g @ b  # (T, r): gradient at the low-rank activation (scaling is inside b)
        if keep is not None:
            gxa = gxa * scale  # the dropout's 1 / (1 - p), applied on r columns rather than d_in
        gx = ga = gb = gbias = None
        if ctx.needs_input_grad[0]:
            gx = g @ weight.to(g.dtype)  # (T, d_in)
            if keep is None:
                gx.addmm_(gxa, a)
            else:
                gx.addcmul_(gxa @ a, keep)
            gx = gx.view(ctx.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            ga = (gxa.t() @ (x2 if keep is None else x2 * keep)).to(ctx.dtypes[0])  # (r, d_in)
        if ctx.needs_input_grad[4]:
            gb = ((g.t() @ xa) * ctx.scaling).to(ctx.dtypes[1])  # (d_out, r)
        if ctx.needs_input_grad[2]:
            gbias = g.sum(0).to(ctx.dtypes[2])
        return gx, None, gbias, ga, gb, None, None


@functools.cache
def _fused_class():
    """A subclass of PEFT's `lora.Linear` whose forward takes the fused path in the plain training case."""
    from peft.tuners.lora import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            plain = (
                not args and not kwargs and torch.is_grad_enabled() and not self.disable_adapters
                and not self.merged and len(self.active_adapters) == 1 and type(self.base_layer) is torch.nn.Linear
            )
            name = self.active_adapters[0] if plain else None
            if not plain or name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
                return super().forward(x, *args, **kwargs)
            drop = self.lora_dropout[name]
            p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
            base = self.base_layer
            return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                                     self.lora_B[name].weight, float(self.scaling[name]), float(p))

    return LoraLinear, FusedLoraLinear


def use_fused_lora(model: torch.nn.Module) -> int:
    """Make every PEFT `lora.Linear` in `model` a `FusedLoraLinear` (same state); returns how many changed."""
    plain, fused = _fused_class()
    n = 0
    for module in model.modules():
        if type(module) is plain:
            module.__class__ = fused
            n += 1
    return n

