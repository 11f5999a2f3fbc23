"""Preference losses: the DPO family and the pairwise reward-model loss, as pure tensor functions.

Inputs are per-pair sequence log-probs, shape (B,): the log-prob of the chosen and of the rejected
response given the prompt (summed over response tokens; SimPO takes the per-token mean instead),
under the policy and, except for SimPO, under the frozen reference. With
h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected):

    sigmoid  -log sigmoid(beta h)                       DPO (Rafailov et al. 2023)
             cDPO: -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (label_smoothing=eps)
    ipo      (h - 1/(2 beta))^2                         IPO (Azar et al. 2023), summed log-probs
    hinge    max(0, 1 - beta h)                         SLiC / RSO hinge
    simpo    -log sigmoid(beta (mean_chosen - mean_rejected) - gamma)   SimPO, reference-free

`preference_loss(name, ...)` picks one from `PREFERENCE_LOSSES` (a registry: add a function, not an
if-branch) and returns `(loss, metrics)`, the loss summed over pairs and divided by `normalizer`
(the trainer's global pair count) or by B. The implicit rewards it logs are
beta * (policy - reference) per response (beta * mean log-prob for SimPO).

`reward_loss` is the reward model's Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin)
plus an optional centring term coef * (r_chosen + r_rejected)^2 that keeps rewards near zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def dpo_sigmoid(h: torch.Tensor, beta: float, label_smoothing: float = 0.0, **_) -> torch.Tensor:
    """DPO / cDPO per-pair loss (B,) from the log-ratio difference h (B,).

    >>> round(float(dpo_sigmoid(torch.tensor([0.0]), beta=0.1)[0]), 6)  # ln 2
    0.693147
    """
    logits = beta * h
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo(h: torch.Tensor, beta: float, **_) -> torch.Tensor:
    """IPO per-pair loss (B,): squared distance of h from 1 / (2 beta).

    >>> float(ipo(torch.tensor([0.0]), beta=0.5)[0])
    1.0
    """
    return (h - 1 / (2 * beta)) ** 2


def hinge(h: torch.Tensor, beta: float, **_) -> torch.Tensor:
    """Hinge per-pair loss (B,): max(0, 1 - beta h).

    >>> hinge(torch.tensor([0.0, 20.0]), beta=0.1).tolist()
    [1.0, 0.0]
    """
    return torch.relu(1 - beta * h)


def simpo(h: torch.Tensor, beta: float, gamma: float = 0.5, label_smoothing: float = 0.0, **_):
    """SimPO per-pair loss (B,); h is mean_chosen - mean_rejected (no reference), gamma the margin.

    >>> round(float(simpo(torch.tensor([5.0]), beta=0.1, gamma=0.5)[0]), 6)  # -log sigmoid(0)
    0.693147
    """
    logits = beta * h - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


PREFERENCE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "ipo": ipo,
    "hinge": hinge,
    "simpo": simpo,
}
REFERENCE_FREE = frozenset({"simpo"})


def preference_loss(
    name: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    sft_nll: torch.Tensor | None = None,
    sft_weight: float = 0.0,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A DPO-family loss over a batch of pairs.

    Args:
        name: a key of PREFERENCE_LOSSES.
        policy_chosen, policy_rejected: (B,) policy sequence log-probs (per-token means for simpo).
        ref_chosen, ref_rejected: (B,) reference sequence log-probs; ignored (may be None) for simpo.
        sft_nll: (B,) per-token mean NLL of the chosen response, added with `sft_weight`.
        normalizer: pairs the loss is averaged over (global batch); None = B.
    Returns:
        loss (scalar), metrics (means over the B pairs, detached): rewards/chosen, rewards/rejected,
        rewards/accuracy, rewards/margin, logps/chosen, logps/rejected [, nll].
    """
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; known: {', '.join(PREFERENCE_LOSSES)}")
    if name in REFERENCE_FREE:
        chosen_reward, rejected_reward = beta * policy_chosen, beta * policy_rejected
        h = policy_chosen - policy_rejected
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"preference loss {name!r} needs reference log-probs")
        chosen_reward = beta * (policy_chosen - ref_chosen)
        rejected_reward = beta * (policy_rejected - ref_rejected)
        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    per_pair = PREFERENCE_LOSSES[name](h, beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    if sft_nll is not None and sft_weight:
        per_pair = per_pair + sft_weight * sft_nll
    loss = per_pair.sum() / (normalizer or per_pair.shape[0])
    cr, rr = chosen_reward.detach().float(), rejected_reward.detach().float()
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracy": (cr > rr).float().mean(),
        "rewards/margin": (cr - rr).mean(),
        "logps/chosen": policy_chosen.detach().float().mean(),
        "logps/rejected": policy_rejected.detach().float().mean(),
    }
    if sft_nll is not None:
        metrics["nll"] = sft_nll.detach().float().mean()
    return loss, metrics


def reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss.

    Args:
        chosen, rejected: (B,) fp32 scores of the chosen and rejected responses.
        margin: (B,) required score gap per pair (0 where the data gives none), or None.
        center_coef: weight of the (chosen + rejected)^2 term.
        normalizer: pairs the loss is averaged over (global batch); None = B.
    Returns:
        loss, metrics (means over the B pairs): rewards/chosen, rewards/rejected, rewards/accuracy,
        rewards/margin.

    >>> loss, m = reward_loss(torch.tensor([1.0]), torch.tensor([1.0]))
    >>> round(float(loss), 6), float(m["rewards/accuracy"])
    (0.693147, 0.0)
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    per_pair = -F.logsigmoid(diff)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen + rejected) ** 2
    loss = per_pair.sum() / (normalizer or per_pair.shape[0])
    c, r = chosen.detach().float(), rejected.detach().float()
    return loss, {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracy": (c > r).float().mean(),
        "rewards/margin": (c - r).mean(),
    }
