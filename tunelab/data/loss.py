"""Weighted next-token cross-entropy over (B, T, V) logits without a full fp32 copy of the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # logits (N, V) in any dtype -> upcast just this chunk; returns the weighted sum of -log p(target)
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()


def weighted_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor,
                  chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean cross-entropy of predicting `input_ids[:, t]` from `logits[:, t-1]`.

    Args:
        logits: (B, T, V) model outputs, any float dtype.
        input_ids: (B, T) the tokens.
        weights: (B, T) weights[:, t] is the weight of predicting input_ids[:, t] (0: not trained on).
        chunk_tokens: rows of the vocabulary softmax computed at once in fp32.

    Returns `(loss, weight_sum)`: loss = sum(w * nll) / sum(w) (0 when nothing has weight), and the
    weight sum (a detached fp32 scalar) so callers can combine micro-batches: `loss * weight_sum`
    is the summed loss. Only positions with weight > 0 are gathered (in the logits' dtype); each chunk
    is upcast to fp32 and, when training, recomputed in backward instead of kept.
    """
    w = weights[:, 1:].to(torch.float32)  # (B, T-1)
    keep = w > 0  # (B, T-1)
    weight_sum = w[keep].sum().detach()
    if not bool(keep.any()):
        return logits.sum() * 0.0, weight_sum
    picked = logits[:, :-1][keep]  # (N, V) positions that predict a weighted token
    targets = input_ids[:, 1:][keep]  # (N,)
    w = w[keep]  # (N,)
    grad = torch.is_grad_enabled() and picked.requires_grad
    total = picked.new_zeros((), dtype=torch.float32)
    for s in range(0, picked.shape[0], chunk_tokens):
        args = (picked[s:s + chunk_tokens], targets[s:s + chunk_tokens], w[s:s + chunk_tokens])
        total = total + (checkpoint(_chunk_nll, *args, use_reentrant=False) if grad else _chunk_nll(*args))
    return total / weight_sum, weight_sum
