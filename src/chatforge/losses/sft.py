"""Supervised next-token loss from per-token log-probs."""

from __future__ import annotations

import torch

from chatforge.losses.reduce import masked_mean, masked_reduce


def nll_loss(token_logps: torch.Tensor, mask: torch.Tensor, reduction: str = "token", normalizer=None):
    """Negative log-likelihood of targets; token_logps and mask are (B, T). Returns (loss, metrics)."""
    loss = masked_reduce(-token_logps, mask, reduction, normalizer)
    return loss, {"nll": masked_mean(-token_logps.detach(), mask)}
