"""One autograd function for a LoRA linear layer: base, dropout, A, B and scaling without full-size extra passes.

PEFT's `lora.Linear.forward` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops, so
each adapter adds three full-size elementwise passes forward (dropout, `* scaling`, `+`) and more backward,
and keeps the dropped-out input as an extra activation. Here the scaling is folded into B and the low-rank
product is accumulated into the base output with one `addmm`; backward does the same for the input
gradient. Only `x`, the dropout mask (on a CPU packed to 1 bit per element) and the (tokens, r) low-rank
activation are saved. The result is the same function with the same parameters (tested against PEFT's
forward and gradients), so adapters stay plain PEFT adapters. PEFT has no fused path for this on CPU, so
it is written here.

`use_fused_lora(model)` makes every PEFT `lora.Linear` use it when the plain case holds (one active
adapter, not merged, no DoRA, a dense base layer, gradients on); anything else takes PEFT's own forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tunelab.fast.dropout import keep_mask_packed_as, unpack_keep_as


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype PEFT's ops would compute in: autocast's when it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def lora_forward(ctx, x2, weight, bias, lora_a, lora_b, scaling: float, p: float) -> tuple[torch.Tensor, tuple]:
    """x2 (T, d_in) in the compute dtype -> (out (T, d_out), tensors backward needs besides x2)."""
    dt = x2.dtype
    a, b = lora_a.to(dt), (lora_b * scaling).to(dt)  # (r, d_in), (d_out, r): tiny casts
    keep = saved_keep = None
    if p > 0:  # inverted dropout: x * keep, with the 1 / (1 - p) applied to the (T, r) product
        if x2.device.type == "cpu":  # backward keeps the mask at 1 bit per element
            keep, saved_keep = keep_mask_packed_as(x2, p)
        else:
            keep = saved_keep = (torch.rand_like(x2) >= p).to(dt)
        xa = F.linear(x2 * keep, a).mul_(1.0 / (1.0 - p))  # (T, r)
    else:
        xa = F.linear(x2, a)  # (T, r)
    out = F.linear(x2, weight.to(dt), None if bias is None else bias.to(dt))  # (T, d_out)
    out.addmm_(xa, b.t())
    ctx.packed = saved_keep is not None and saved_keep.dtype == torch.uint8
    ctx.scaling, ctx.p = scaling, p
    ctx.dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
    return out, (saved_keep, xa, weight, a, b)


def lora_backward(ctx, g, x2, saved_keep, xa, weight, a, b, need_x: bool, need_bias: bool, need_a: bool,
                  need_b: bool) -> tuple:
    """g (T, d_out) -> (gx2 (T, d_in) in x2's dtype, gbias, ga, gb); None where not needed."""
    keep = unpack_keep_as(saved_keep, x2.shape, x2.dtype) if ctx.packed else saved_keep
    g = g.to(x2.dtype)
    gxa = g @ b  # (T, r): gradient at the low-rank activation (scaling is inside b)
    if keep is not None:
        gxa = gxa * (1.0 / (1.0 - ctx.p))  # the dropout's 1 / (1 - p), applied on r columns rather than d_in
    gx = ga = gb = gbias = None
    if need_x:
        gx = g @ weight.to(g.dtype)  # (T, d_in)
        if keep is None:
            gx.addmm_(gxa, a)
        else:
            gx.addcmul_(gxa @ a, keep)
    if need_a:
        ga = (gxa.t() @ (x2 if keep is None else x2 * keep)).to(ctx.dtypes[0])  # (r, d_in)
    if need_b:
        gb = ((g.t() @ xa) * ctx.scaling).to(ctx.dtypes[1])  # (d_out, r)
    if need_bias:
        gbias = g.sum(0).to(ctx.dtypes[2])
    return gx, gbias, ga, gb


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        # x (..., d_in) · weight (d_out, d_in) · lora_a (r, d_in) · lora_b (d_out, r)
        shape, x_dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).to(compute_dtype(x))  # (T, d_in)
        out, saved = lora_forward(ctx, x2, weight, bias, lora_a, lora_b, scaling, p)
        ctx.save_for_backward(x2, *saved)
        ctx.shape, ctx.x_dtype = shape, x_dtype
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        need = ctx.needs_input_grad
        gx, gbias, ga, gb = lora_backward(ctx, grad.reshape(-1, grad.shape[-1]), *ctx.saved_tensors,
                                          need[0], need[2], need[3], need[4])
        if gx is not None:
            gx = gx.view(ctx.shape).to(ctx.x_dtype)
        return gx, None, gbias, ga, gb, None, None


@functools.cache
def _fused_class():
    """A subclass of PEFT's `lora.Linear` whose forward takes the fused path in the plain training case."""
    from peft.tuners.lora import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        def fused_args(self) -> tuple | None:
            """(weight, bias, lora_a, lora_b, scaling, p) in the plain training case, else None."""
            plain = (
                torch.is_grad_enabled() and not self.disable_adapters and not self.merged
                and len(self.active_adapters) == 1 and type(self.base_layer) is torch.nn.Linear
            )
            name = self.active_adapters[0] if plain else None
            if not plain or name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
                return None
            drop = self.lora_dropout[name]
            p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
            return (self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                    float(self.scaling[name]), float(p))

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            fused = None if args or kwargs else self.fused_args()
            if fused is None:
                return super().forward(x, *args, **kwargs)
            return _LoraLinear.apply(x, *fused)

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

