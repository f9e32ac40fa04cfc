"""The fused lm_head + loss: run the output layer inside the loss so the (B, T, V) logits are never built."""

from __future__ import annotations

import inspect

import torch


class FusedHead:
    """Run the lm_head inside the loss (`tunelab.models.losses.linear_weighted_loss`) so the (B, T, V) logits are never built.

    A forward hook keeps the decoder's last hidden state and the model is asked for no logits
    (`logits_to_keep` = no position). `None` from `attach` when the model's head is not a plain bias-free
    linear layer (logit scaling, softcapping): the loss then runs on the model's own logits.
    """

    def __init__(self, decoder: torch.nn.Module, head: torch.nn.Linear):
        self.head, self.hidden = head, None
        decoder.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    @staticmethod
    def no_positions(device) -> torch.Tensor:
        """`logits_to_keep` that keeps no position: the model computes no logits at all."""
        return torch.zeros(0, dtype=torch.long, device=device)

    @classmethod
    def attach(cls, model) -> FusedHead | None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head, cfg = base.get_output_embeddings(), base.config
        plain = type(head) is torch.nn.Linear and head.bias is None and not any(
            getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        if not plain or "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return None
        return cls(base.get_decoder(), head)

    def pop(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        return hidden
