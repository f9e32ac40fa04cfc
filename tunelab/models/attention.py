"""Padding-free packed attention: causal attention per packed example, registered as a transformers attention.

Packing several examples into one row and masking them apart (block-diagonal mask) makes every key attend
to every query of the row: SDPA cannot skip the masked blocks, so a 1024-token row of two 450-token
examples costs ~4x the attention of the examples alone. Flash-attention's varlen kernels avoid that on
CUDA; nothing does on a CPU, so this is written here: a flattened batch (1, N) with `cu_seq_lens_q`
(offsets of the examples) gets one causal attention per example. Anything else (a padded batch with an
attention mask, generation with a cache) goes to transformers' own SDPA unchanged.

On a CPU each example's attention is `_ExampleAttention`: plain batched matmuls in bf16, with the
probabilities kept for backward (examples are short, so they are small). torch's CPU flash kernel spends
~3x its forward time in backward. Measured on the bundled model, 3k tokens per layer: flash 0.147 s, this
with recomputed probabilities 0.05 s, and 37% less again with them saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED = "tunelab_packed"


@torch.compiler.disable  # one SDPA call per example: Python-level shapes, kept out of compiled graphs
def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, shared_prefix: int = 0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """query (1, H, N, D), key/value (1, KV, N, D) -> (1, N, H, D), attending within [cu[i], cu[i+1]) only.

    shared_prefix = p > 0: segment 0 is [0, p) and every later segment also attends to all of it."""
    if cu_seq_lens_q is None or attention_mask is not None or query.shape[0] != 1 or \
            query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu_seq_lens_q.tolist()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    p = shared_prefix
    if p and (bounds[1] != p or dropout):
        raise ValueError(f"shared_prefix={p} must be the first segment (cu_seq_lens_q {bounds[:3]}...), "
                         "without attention dropout")
    if p or (query.device.type == "cpu" and not dropout):
        # one dtype for q, k and v: under autocast over fp32 weights (full finetuning) rotary leaves q and k in
        # fp32 while v is bf16, and _ExampleAttention's backward runs outside autocast
        device = query.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
        # split, not slices: backward joins the pieces' gradients with one cat, where each slice's backward
        # would write its gradient into a zero tensor the size of the whole batch
        sizes = [e - s for s, e in zip(bounds, bounds[1:])]
        qs, ks, vs = (t[0].split(sizes, dim=1) for t in (query, key, value))  # each (H | KV, n_i, D)
        outs = [_ExampleAttention.apply(q, torch.cat([ks[0], k], 1) if p and i else k,
                                        torch.cat([vs[0], v], 1) if p and i else v, scale)[None]
                for i, (q, k, v) in enumerate(zip(qs, ks, vs)) if q.shape[1]]  # each (1, H, n_i, D)
    else:
        gqa = query.shape[1] != key.shape[1]
        outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                               dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
                for s, e in zip(bounds, bounds[1:]) if e > s]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (1, H, N, D)
    return out.transpose(1, 2).contiguous(), None


class _ExampleAttention(torch.autograd.Function):
    """Causal attention of one example, grouped-query aware: q (H, n, D), k/v (KV, m, D) -> (H, n, D).

    With m > n the queries are the last n of the m positions (an example after a shared prefix).

    The G = H / KV query heads sharing a key head are stacked along the sequence, so each product is one
    (KV, G n, D) x (KV, D, m) batched matmul and keys are never repeated. The (KV, G n, m) probabilities are
    saved for backward when they are small (1.3 MB for the bundled model at n = 170, m = 420; recomputing
    them cost 40% of this function's time); above `SAVE_PROBS_MAX` elements (long examples) backward
    recomputes them, flash-attention style, so memory stays linear in the sequence length.
    """

    SAVE_PROBS_MAX = 2 * 2**20  # elements: 4 MiB in bf16 per call; ~480-token examples on the bundled model

    @staticmethod
    def _probs(q, k, scale):  # -> (KV, G n, m) softmax in q's dtype (fp32 inside the kernel)
        KV, m, n = k.shape[0], k.shape[1], q.shape[1]
        s = torch.bmm((q * scale).reshape(KV, -1, q.shape[-1]), k.transpose(1, 2))  # (KV, G n, m)
        causal = torch.full((n, m), float("-inf"), dtype=s.dtype, device=s.device).triu_(m - n + 1)  # 0 or -inf
        s.view(KV, -1, n, m).add_(causal)  # the same (n, m) mask for every group head
        return torch.softmax(s, dim=-1)

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        p = _ExampleAttention._probs(q, k, scale)  # (KV, G n, m)
        out = torch.bmm(p, v).view(q.shape)  # (KV, G n, D) -> (H, n, D)
        ctx.save_for_backward(q, k, v, out, p if p.numel() <= _ExampleAttention.SAVE_PROBS_MAX else None)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, p = ctx.saved_tensors
        if p is None:
            p = _ExampleAttention._probs(q, k, ctx.scale)
        KV, D = k.shape[0], q.shape[-1]
        do = d_out.reshape(KV, -1, D).to(v.dtype)  # (KV, G n, D)
        dv = torch.bmm(p.transpose(1, 2), do)  # (KV, m, D)
        delta = (do.float() * out.reshape(KV, -1, D).float()).sum(-1, keepdim=True)  # (KV, G n, 1) fp32
        # dscores in q's dtype: an op mixing bf16 and fp32 operands is ~7x slower on a CPU than one in bf16
        ds = torch.bmm(do, v.transpose(1, 2)).sub_(delta.to(q.dtype)).mul_(p)  # (KV, G n, m)
        dq = torch.bmm(ds, k).view(q.shape).mul_(ctx.scale)  # (H, n, D)
        dk = torch.bmm(ds.transpose(1, 2), q.reshape(KV, -1, D)).mul_(ctx.scale)  # (KV, m, D)
        return dq, dk, dv, None


AttentionInterface.register(PACKED, packed_attention)  # no mask function: transformers builds no mask for it


def use_packed_attention(model) -> None:
    """Switch a (PEFT-wrapped) transformers model to `packed_attention` (padded batches still use SDPA)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(PACKED)
