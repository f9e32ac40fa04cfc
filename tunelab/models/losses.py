"""Training losses as autograd functions: weighted next-token cross-entropy without a full fp32 logits copy.

Over (B, T, V) logits (`weighted_loss`) or hidden states and the output head (`linear_weighted_loss`), with the
loss weights `tunelab.data` gives each token; the trainer and the memory measurement compute them. The
vocabulary softmax is computed in fp32 a chunk of positions at a time, in forward and again in backward, and
only at positions whose target has weight > 0; the only full-size tensor created is the gradient of the
logits (in their own dtype), which the model's backward needs anyway.
"""

from __future__ import annotations

import torch


class _WeightedNLL(torch.autograd.Function):
    """sum_i w_i * -log softmax(logits[b_i, t_i])[target_i], chunked; the gradient is computed in closed form."""

    @staticmethod
    def forward(ctx, logits, b_idx, t_idx, targets, weights, chunk: int):
        # logits (B, T, V); b_idx, t_idx, targets, weights (N,)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, targets.numel(), chunk):
            x = logits[b_idx[s:s + chunk], t_idx[s:s + chunk]].float()  # (n, V)
            target_logit = x.gather(1, targets[s:s + chunk, None]).squeeze(1)  # (n,)
            total += ((torch.logsumexp(x, dim=-1) - target_logit) * weights[s:s + chunk]).sum()
        ctx.save_for_backward(logits, b_idx, t_idx, targets, weights)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, b_idx, t_idx, targets, weights = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # (B, T, V) in the logits' dtype
        for s in range(0, targets.numel(), ctx.chunk):
            b, t = b_idx[s:s + ctx.chunk], t_idx[s:s + ctx.chunk]
            p = torch.softmax(logits[b, t].float(), dim=-1)  # (n, V): d(-log p_y)/dx = softmax - onehot(y)
            p[torch.arange(p.shape[0], device=p.device), targets[s:s + ctx.chunk]] -= 1.0
            p *= (weights[s:s + ctx.chunk] * grad_total)[:, None]
            grad.index_put_((b, t), p.to(grad.dtype), accumulate=True)  # shared sources add up
        return grad, None, None, None, None, None


def loss_positions(input_ids: torch.Tensor, weights: torch.Tensor, sources: torch.Tensor | None = None):
    """Which outputs predict which tokens: (b_idx, src_idx, targets, w), each (N,), over weighted tokens.

    Token `input_ids[b, t]` with weight `weights[b, t] > 0` is predicted from position `t - 1`, or from
    `sources[b, t]` when given (a shared-prefix batch: an example's first token after the shared prefix
    is predicted from the prefix's last position, not from the previous example's end).
    """
    w = weights.to(torch.float32)
    keep = w > 0
    keep[:, 0] = False  # nothing predicts a row's first token
    b_idx, t_idx = keep.nonzero(as_tuple=True)  # (N,) weighted target positions
    src = t_idx - 1 if sources is None else sources[b_idx, t_idx]
    return b_idx, src, input_ids[b_idx, t_idx], w[b_idx, t_idx]


def weighted_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor,
                  chunk_tokens: int = 256, sources: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean cross-entropy of predicting `input_ids[:, t]` from `logits[:, t-1]`.

    Args:
        logits: (B, T, V) model outputs, any float dtype (bf16 stays bf16; chunks are upcast to fp32).
        input_ids: (B, T) the tokens.
        weights: (B, T) weights[:, t] is the weight of predicting input_ids[:, t] (0: not trained on).
        chunk_tokens: positions whose vocabulary softmax is held in fp32 at once (256 x 49152 x 4 B = 48 MiB).
        sources: optional (B, T) position predicting each token (default t - 1; see `loss_positions`).

    Returns `(loss, weight_sum)`: loss = sum(w * nll) / sum(w) (0 when nothing has weight) and the
    weight sum (a detached fp32 scalar), so `loss * weight_sum` is the summed loss of the batch and
    micro-batches combine as sum(loss_i * wsum_i) / sum(wsum_i).
    """
    b_idx, src, targets, w = loss_positions(input_ids, weights, sources)
    weight_sum = w.sum().detach()
    if not targets.numel():
        return logits.sum() * 0.0, weight_sum
    total = _WeightedNLL.apply(logits, b_idx, src, targets, w, chunk_tokens)
    return total / weight_sum, weight_sum


class _LinearWeightedNLL(torch.autograd.Function):
    """sum_i w_i * -log softmax(h_i @ W^T)[y_i], a chunk of rows at a time: the logits never exist whole.

    Written here because the fused linear + cross-entropy kernels (Liger, Apple's Cut Cross-Entropy) are
    Triton-only; this is Liger's algorithm in plain torch so it runs on a CPU. The loss is a leaf of the
    graph, so its gradient is computed in the forward pass, chunk by chunk while the chunk's logits exist:
    dlogits = w * (softmax - onehot), dh = dlogits @ W (and dW = dlogits^T @ h when W is trained); backward
    only scales them by the incoming gradient. Nothing of size V is kept.
    """

    ROWS = 16  # rows of a chunk's logits upcast to fp32 at once: 16 x V x 4 B = 3 MiB stays in cache

    @staticmethod
    def forward(ctx, h, weight, targets, w, chunk: int, dtype: torch.dtype, grads: tuple[bool, bool]):
        # h (N, d), weight (V, d), targets (N,), w (N,)
        W = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if grads[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grads[1] else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk].to(dtype)
            logits = hc @ W.T  # (n, V) in `dtype`: one large matmul per chunk
            # the softmax runs in fp32 on a few rows at a time, in cache (head + loss ~1.5x faster on a CPU than
            # on the whole (n, V) chunk at once); each block's dloss/dlogits overwrites its logits in place
            n, m = logits.shape[0], _LinearWeightedNLL.ROWS
            for r in range(0, n, m):
                tc, wc = targets[s + r:s + min(r + m, n)], w[s + r:s + min(r + m, n)]
                x = logits[r:r + m].float()  # (m, V)
                lse = torch.logsumexp(x, dim=-1)  # (m,)
                total += ((lse - x.gather(1, tc[:, None]).squeeze(1)) * wc).sum()
                if grad_h is None and grad_w is None:
                    continue
                p = x.sub_(lse[:, None]).exp_()  # (m, V) softmax, in place of the logits
                p[torch.arange(p.shape[0], device=p.device), tc] -= 1.0
                logits[r:r + m] = p.mul_(wc[:, None])  # dloss/dlogits, rounded to `dtype`
            if grad_h is not None:
                grad_h[s:s + chunk] = (logits @ W).to(h.dtype)
            if grad_w is not None:
                grad_w += (logits.T @ hc).float()
        ctx.grad_h, ctx.grad_w = grad_h, None if grad_w is None else grad_w.to(weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # d(total)/dh and d(total)/dW were computed in forward
        grad_h = None if ctx.grad_h is None else ctx.grad_h * grad_total.to(ctx.grad_h.dtype)
        grad_w = None if ctx.grad_w is None else ctx.grad_w * grad_total.to(ctx.grad_w.dtype)
        ctx.grad_h = ctx.grad_w = None
        return grad_h, grad_w, None, None, None, None, None


def linear_weighted_loss(hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor,
                         weights: torch.Tensor, chunk_tokens: int = 512,
                         sources: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`weighted_loss` of logits = hidden @ head_weight^T, fused: the (B, T, V) logits are never built.

    Args:
        hidden: (B, T, d) final hidden states (after the last norm).
        head_weight: (V, d) the output projection (lm_head without bias, logit scaling or softcapping).
        input_ids, weights, sources: as in `weighted_loss`.
        chunk_tokens: positions whose logits exist at once (512 x 49152 x 2 B = 48 MiB in bf16; the fp32 softmax
            runs on 16 rows of them at a time).

    Only positions with weight > 0 are projected, so a prompt weight of 0 also skips the prompt's share of
    the lm_head. Matmuls run in the autocast dtype when autocast is on, else in `hidden`'s dtype; the
    softmax is fp32. Returns `(loss, weight_sum)` like `weighted_loss`.
    """
    b_idx, src, targets, w = loss_positions(input_ids, weights, sources)
    weight_sum = w.sum().detach()
    if not targets.numel():
        return hidden.sum() * 0.0, weight_sum
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    h = hidden[b_idx, src]  # (N, d)
    grads = (torch.is_grad_enabled() and h.requires_grad, torch.is_grad_enabled() and head_weight.requires_grad)
    total = _LinearWeightedNLL.apply(h, head_weight, targets, w, chunk_tokens, dtype, grads)
    return total / weight_sum, weight_sum
