"""Masked reductions and the named loss-reduction modes every loss uses.

`normalizer` lets the trainer pass the unit count of the whole accumulated (and data-parallel)
batch, which makes 4 micro-batches of 1 give exactly the gradient of 1 micro-batch of 4.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("token", "sequence", "sum", "constant")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return masked_sum(x, m, dim) / (m.sum() if dim is None else m.sum(dim)).clamp(min=1e-8)


def count_units(mask: torch.Tensor, mode: str = "token", length: int = 0) -> int:
    """Units a loss averages over: tokens ("token"), non-empty rows ("sequence"), 1 ("sum"), or
    rows x `length` ("constant": Dr. GRPO's fixed normaliser, `length` = the generation limit)."""
    if mode == "constant":
        return int(mask.shape[0]) * int(length or mask.shape[1])
    if mode == "token":
        return int(mask.sum())
    if mode == "sequence":
        return int((mask.sum(-1) > 0).sum())
    if mode == "sum":
        return 1
    raise ValueError(f"unknown reduction {mode!r}; known: {', '.join(REDUCTIONS)}")


def masked_reduce(x: torch.Tensor, mask: torch.Tensor, mode: str = "token", normalizer: float | None = None):
    """Reduce per-token values x (B, T) under mask (B, T) by `mode`, dividing by `normalizer` if given.

    "constant" divides the masked sum by `normalizer` (`count_units(mask, "constant", length)` of
    the global batch), else by B x T: the same divisor whatever the answers' lengths.
    """
    m = mask.to(x.dtype)
    if mode == "constant":
        return masked_sum(x, m) / (normalizer or m.numel())
    if mode == "token":
        return masked_sum(x, m) / (normalizer or m.sum().clamp(min=1))
    if mode == "sequence":
        rows = m.sum(-1)
        per_row = masked_sum(x, m, -1) / rows.clamp(min=1)
        return per_row.sum() / (normalizer or (rows > 0).sum().clamp(min=1))
    if mode == "sum":
        return masked_sum(x, m)
    raise ValueError(f"unknown reduction {mode!r}; known: {', '.join(REDUCTIONS)}")
