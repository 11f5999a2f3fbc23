"""Advantages for policy-gradient RL: GAE over response tokens, whitening, and GRPO group scores.

Shapes: B sequences, T response positions; `mask` (B, T) is 1 on real response tokens (a
contiguous run from position 0, padding after it). Everything is fp32 and gradient-free.
"""

from __future__ import annotations

import torch

from chatforge.losses.reduce import masked_mean


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages, returns), both (B, T), zero off the mask.

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last response token, and
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V.

    >>> a, r = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.0)
    >>> a.tolist(), r.tolist()
    ([[1.0, 1.0]], [[1.0, 1.0]])
    """
    m = mask.float()
    rewards, values = rewards.float() * m, values.float() * m
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + values) * m


@torch.no_grad()
def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries; with shift_mean=False only rescales. Zero off the mask."""
    m = mask.float()
    mean = masked_mean(x.float(), m)
    var = masked_mean((x.float() - mean).square(), m)
    out = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: each reward minus its group's mean (divided by the group's std when `scale`).

    rewards (B,) with B = prompts * group_size, the answers to one prompt adjacent. Returns (B,).

    >>> [round(a, 3) for a in group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2).tolist()]
    [0.707, -0.707, 0.0, 0.0]
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    centred = g - g.mean(-1, keepdim=True)
    if scale:
        centred = centred / (g.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)
