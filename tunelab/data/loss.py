"""Weighted next-token cross-entropy over (B, T, V) logits without a full fp32 copy of the logits.

The vocabulary softmax is computed in fp32 a chunk of positions at a time, in forward and again in
backward, and only at positions whose target has weight > 0; the only full-size tensor created is the
gradient of the logits (in their own dtype), which the model's backward needs anyway.
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
            grad[b, t] = p.to(grad.dtype)
        return grad, None, None, None, None, None


def weighted_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor,
                  chunk_tokens: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean cross-entropy of predicting `input_ids[:, t]` from `logits[:, t-1]`.

    Args:
        logits: (B, T, V) model outputs, any float dtype (bf16 stays bf16; chunks are upcast to fp32).
        input_ids: (B, T) the tokens.
        weights: (B, T) weights[:, t] is the weight of predicting input_ids[:, t] (0: not trained on).
        chunk_tokens: positions whose vocabulary softmax is held in fp32 at once (256 x 49152 x 4 B = 48 MiB).

    Returns `(loss, weight_sum)`: loss = sum(w * nll) / sum(w) (0 when nothing has weight) and the
    weight sum (a detached fp32 scalar), so `loss * weight_sum` is the summed loss of the batch and
    micro-batches combine as sum(loss_i * wsum_i) / sum(wsum_i).
    """
    w = weights[:, 1:].to(torch.float32)  # (B, T-1): weight of the target at t+1
    keep = w > 0
    weight_sum = w[keep].sum().detach()
    if not bool(keep.any()):
        return logits.sum() * 0.0, weight_sum
    b_idx, t_idx = keep.nonzero(as_tuple=True)  # (N,) positions t that predict a weighted token t+1
    targets = input_ids[b_idx, t_idx + 1]  # (N,)
    total = _WeightedNLL.apply(logits, b_idx, t_idx, targets, w[b_idx, t_idx], chunk_tokens)
    return total / weight_sum, weight_sum
