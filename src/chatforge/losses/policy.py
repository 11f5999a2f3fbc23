"""Clipped policy and value losses for PPO and GRPO, as pure tensor functions.

Shapes: B sequences, T response positions. `mask` (B, T) is 1 on response tokens that count.
`reduction` is a named mode from `chatforge.losses.reduce` ("token" mean over all masked tokens of
the global batch, "sequence" mean of per-sequence means); pass the trainer's `normalizer` so
gradient accumulation over micro-batches gives the same gradient as one large batch.
"""

from __future__ import annotations

import torch

from chatforge.losses.reduce import masked_mean, masked_reduce


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    reduction: str = "token",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).

    logp (B, T) requires grad; old_logp (B, T) from the rollout policy; advantages (B, T), or
    (B, 1) for one advantage per sequence (GRPO). Metrics: clip_frac (share of tokens where the
    clipped term was chosen), approx_kl (k3 of old vs new, detached), ratio_mean.
    """
    log_ratio = logp.float() - old_logp.float()
    ratio = log_ratio.exp()
    adv = advantages.float().expand_as(ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = masked_reduce(-torch.minimum(unclipped, clipped), mask, reduction, normalizer)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    reduction: str = "token",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip within eps of the old value.

    values (B, T) requires grad; old_values and returns (B, T). clip_eps None or 0 disables the
    clip. Metrics: value_clip_frac, value_mean.
    """
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    err = (values - returns).square()
    if clip_eps:
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err_clip = (v_clip - returns).square()
        per_token = torch.maximum(err, err_clip)
        clip_frac = masked_mean((err_clip > err).float().detach(), mask)
    else:
        per_token, clip_frac = err, values.new_zeros(())
    loss = 0.5 * masked_reduce(per_token, mask, reduction, normalizer)
    return loss, {"value_clip_frac": clip_frac, "value_mean": masked_mean(values.detach(), mask)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over masked tokens: 1 is a perfect critic, <= 0 is no better than a mean.

    >>> r = torch.tensor([[1.0, 2.0, 3.0]])
    >>> float(explained_variance(r, r, torch.ones(1, 3)))
    1.0
    """
    m = mask.bool()
    v, r = values.detach().float()[m], returns.detach().float()[m]
    var = r.var(unbiased=False)
    return 1.0 - (r - v).var(unbiased=False) / var.clamp(min=1e-8)
