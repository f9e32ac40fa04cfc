"""Padding-free packed attention: causal attention per packed example, registered as a transformers attention.

Packing several examples into one row and masking them apart (block-diagonal mask) makes every key attend
to every query of the row: SDPA cannot skip the masked blocks, so a 1024-token row of two 450-token
examples costs ~4x the attention of the examples alone. Flash-attention's varlen kernels avoid that on
CUDA; nothing does on a CPU, so this is written here: a flattened batch (1, N) with `cu_seq_lens_q`
(offsets of the examples) gets one causal attention per example. Anything else (a padded batch with an
attention mask, generation with a cache) goes to transformers' own SDPA unchanged.

On a CPU each example's attention is `_ExampleAttention`: plain batched matmuls in bf16 that recompute the
probabilities in backward. torch's CPU flash kernel spends ~3x its forward time in backward. Measured on
the bundled model, 3k tokens per layer: flash 0.147 s, this 0.05 s.
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

    shared_prefix = p > 0: segment 0 is [0, p) and every later segment also attends to all of it.
    Features this kernel does not implement (a softcap, a sliding window shorter than an example, sinks)
    raise rather than silently compute another function; `unsupported_features` finds them up front."""
    _refuse_unsupported(kwargs, cu_seq_lens_q)
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
        outs = [_ExampleAttention.apply(q, k, v, scale, *((ks[0], vs[0]) if p and i else ()))[None]
                for i, (q, k, v) in enumerate(zip(qs, ks, vs)) if q.shape[1]]  # each (1, H, n_i, D)
    else:
        gqa = query.shape[1] != key.shape[1]
        outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                               dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
                for s, e in zip(bounds, bounds[1:]) if e > s]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (1, H, N, D)
    return out.transpose(1, 2).contiguous(), None


def _refuse_unsupported(kwargs: dict, cu_seq_lens_q: torch.Tensor | None) -> None:
    if kwargs.get("softcap"):
        raise ValueError(f"packed_attention does not implement logit softcapping (softcap={kwargs['softcap']})")
    if kwargs.get("s_aux") is not None:
        raise ValueError("packed_attention does not implement attention sinks")
    window = kwargs.get("sliding_window")
    if window and cu_seq_lens_q is not None and int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max()) > window:
        raise ValueError(f"packed_attention does not implement a sliding window ({window} tokens)")


class _ExampleAttention(torch.autograd.Function):
    """Causal attention of one example, grouped-query aware: q (H, n, D), k/v (KV, m, D) -> (H, n, D).

    With m > n the queries are the last n of the m positions (an example after a shared prefix). A shared
    prefix comes as k_prefix/v_prefix (KV, p, D), joined to k/v inside, so backward keeps the prefix once per
    micro-batch (every example's inputs are views of the same projections), not a joined copy per example.

    The G = H / KV query heads sharing a key head are stacked along the sequence, so each product is one
    (KV, G n, D) x (KV, D, m) batched matmul and keys are never repeated. Backward keeps neither the output
    (softmax's row term is sum(p * dp), where flash-attention uses sum(dO * O)) nor the (KV, G n, m)
    probabilities: it recomputes them, flash-attention style, so memory stays linear in the length. Keeping
    them took ~7 KB per token per layer on the bundled model (~30% of a LoRA step's activations at 1k-token
    rows) and saved no measurable time: 241-257 positions/s either way, in runs that vary by 10%.
    """

    @staticmethod
    def _probs(q, k, scale):  # -> (KV, G n, m) softmax in q's dtype (fp32 inside the kernel)
        KV, m, n = k.shape[0], k.shape[1], q.shape[1]
        s = torch.bmm((q * scale).reshape(KV, -1, q.shape[-1]), k.transpose(1, 2))  # (KV, G n, m)
        causal = torch.full((n, m), float("-inf"), dtype=s.dtype, device=s.device).triu_(m - n + 1)  # 0 or -inf
        s.view(KV, -1, n, m).add_(causal)  # the same (n, m) mask for every group head
        return torch.softmax(s, dim=-1)

    @staticmethod
    def forward(ctx, q, k, v, scale: float, k_prefix=None, v_prefix=None):
        keys, values = (k, v) if k_prefix is None else (torch.cat([k_prefix, k], 1), torch.cat([v_prefix, v], 1))
        p = _ExampleAttention._probs(q, keys, scale)  # (KV, G n, m)
        out = torch.bmm(p, values).view(q.shape)  # (KV, G n, D) -> (H, n, D)
        # the caller's views (of the whole micro-batch's projections), not the joined copies
        ctx.save_for_backward(q, k, v, k_prefix, v_prefix)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, k_prefix, v_prefix = ctx.saved_tensors
        if k_prefix is not None:
            k, v = torch.cat([k_prefix, k], 1), torch.cat([v_prefix, v], 1)  # (KV, m, D)
        p = _ExampleAttention._probs(q, k, ctx.scale)  # (KV, G n, m)
        KV, D = k.shape[0], q.shape[-1]
        do = d_out.reshape(KV, -1, D).to(v.dtype)  # (KV, G n, D)
        dv = torch.bmm(p.transpose(1, 2), do)  # (KV, m, D)
        dp = torch.bmm(do, v.transpose(1, 2))  # (KV, G n, m)
        delta = (dp * p).sum(-1, keepdim=True, dtype=torch.float32)  # (KV, G n, 1): softmax's row term, fp32
        # dscores in q's dtype: an op mixing bf16 and fp32 operands is ~7x slower on a CPU than one in bf16
        ds = dp.sub_(delta.to(q.dtype)).mul_(p)  # (KV, G n, m)
        dq = torch.bmm(ds, k).view(q.shape).mul_(ctx.scale)  # (H, n, D)
        dk = torch.bmm(ds.transpose(1, 2), q.reshape(KV, -1, D)).mul_(ctx.scale)  # (KV, m, D)
        if k_prefix is None:
            return dq, dk, dv, None, None, None
        n_p = k_prefix.shape[1]
        return dq, dk[:, n_p:], dv[:, n_p:], None, dk[:, :n_p], dv[:, :n_p]


def unsupported_features(config, max_length: int | None = None) -> list[str]:
    """What a model's attention does that `packed_attention` does not implement (empty: it is the same function).

    Logit softcapping (Gemma-2), a sliding window shorter than the sequences (Gemma-2/3, Mistral, Qwen2 with
    `use_sliding_window`), chunked attention (Llama-4) and attention sinks (gpt-oss) all change the function."""
    found = []
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "attn_logit_softcapping", None):
        found.append(f"attention logit softcapping (attn_logit_softcapping={cfg.attn_logit_softcapping})")
    window = getattr(cfg, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or []) or \
        getattr(cfg, "use_sliding_window", True) is not False
    if window and sliding and (max_length is None or window < max_length):
        found.append(f"a sliding window of {window} tokens")
    if getattr(cfg, "attention_chunk_size", None):
        found.append(f"chunked attention (attention_chunk_size={cfg.attention_chunk_size})")
    if "sinks" in type(cfg).__name__.lower() or getattr(cfg, "model_type", "") == "gpt_oss":
        found.append("attention sinks")
    return found


def use_packed_attention(model) -> None:
    """Switch a (PEFT-wrapped) transformers model to `packed_attention` (padded batches still use SDPA)."""
    if PACKED not in AttentionInterface._global_mapping:  # no mask function: transformers builds no mask for it
        AttentionInterface.register(PACKED, packed_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(PACKED)
