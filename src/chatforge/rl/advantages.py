"""Advantage estimators for policy-gradient RL: a small registry of pure functions.

    ppo.advantage   critic  groups  sequence score s_i -> advantages A (B, T)
    gae             yes     no      r_t = -kl_coef * KL_t (+ s_i at the last token); GAE(gamma, lambda)
                                    with the critic's values; whitened over the batch (optional)
    group_norm      no      yes     s_i -> (s_i - mean_g) / (std_g + eps) (GRPO); A_t = reward-to-go of r
    rloo            no      yes     s_i -> s_i - mean of the other k-1 answers to its prompt
                                    (REINFORCE leave-one-out); A_t = reward-to-go of r
    reinforce_pp    no      no      A_t = reward-to-go of r (token-level KL in the reward), whitened
                                    over the global batch (REINFORCE++)
    reinforce_pp_baseline no yes    s_i -> s_i - mean_g first, then as reinforce_pp

where r_t = -kl_coef * KL_t on every response token plus the (shaped) score at the last one, and
"reward-to-go" is sum_{u >= t} gamma^(u - t) r_u. The group estimators need the k answers to one
prompt adjacent in the batch (B = prompts * k, `group_size` = k >= 2).

Shapes: B sequences, T response positions; `mask` (B, T) is 1 on real response tokens (a
contiguous run from position 0, padding after it). Everything is fp32, gradient-free, and zero off
the mask. `all_sum` sums a tensor over data-parallel processes (identity in one process): the
global whitening of gae and reinforce_pp uses it, so 2 processes x B/2 equal 1 process x B. Nothing
here imports more than torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AllSum = Callable[[torch.Tensor], torch.Tensor]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


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
def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{u >= t} gamma^(u - t) r_u over each row's response tokens (B, T).

    >>> reward_to_go(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 0]]), 0.5).tolist()
    [[2.0, 2.0, 0.0]]
    """
    return gae(rewards, torch.zeros_like(rewards, dtype=torch.float32), mask, gamma, 1.0)[0]


@torch.no_grad()
def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, all_sum: AllSum = _local
) -> torch.Tensor:
    """(x - mean) / std over masked entries (of every process, via `all_sum`); with shift_mean=False
    only rescales. Zero off the mask."""
    m = mask.float()
    x = x.float()
    total = all_sum(torch.stack([(x * m).sum(), m.sum()]).double())
    mean = (total[0] / total[1].clamp(min=1)).float()
    sq = all_sum(((x - mean).square() * m).sum().double().reshape(1))
    var = (sq[0] / total[1].clamp(min=1)).float()
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} rewards do not split into groups of {group_size}")
    return scores.float().view(-1, group_size)


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: each reward minus its group's mean (divided by the group's std when `scale`).

    rewards (B,) with B = prompts * group_size, the answers to one prompt adjacent. Returns (B,).

    >>> [round(a, 3) for a in group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2).tolist()]
    [0.707, -0.707, 0.0, 0.0]
    """
    g = _groups(rewards, group_size)
    centred = g - g.mean(-1, keepdim=True)
    if scale:
        centred = centred / (g.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


@torch.no_grad()
def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reward minus the mean of the other answers to its prompt. (B,) -> (B,).

    >>> leave_one_out(torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 3.0]), 3).tolist()
    [1.0, -0.5, -0.5, 0.0, 0.0, 0.0]
    """
    g = _groups(rewards, group_size)
    if group_size < 2:
        raise ValueError("leave-one-out needs at least 2 answers per prompt")
    others = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


@torch.no_grad()
def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, R): -kl_coef * kl on response tokens, plus each score at its last token.

    >>> r = token_rewards(torch.ones(1, 3), torch.tensor([2.0]), torch.tensor([[1, 1, 0]]), 0.1)
    >>> [round(x, 4) for x in r[0].tolist()]
    [-0.1, 1.9, 0.0]
    """
    m = mask.float()
    rewards = (-kl_coef * kl.float()).masked_fill(m == 0, 0.0)
    last = (m.sum(1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores.float().to(rewards.device)[:, None])


# ---- the registry --------------------------------------------------------------------------------
# Every estimator: (scores (B,), kl (B, T), mask (B, T), values (B, T) or None, kl_coef, group_size,
# gamma, lam, whiten_advantages, all_sum) -> (advantages (B, T), returns (B, T)). For the critic-free
# estimators `returns` is the reward-to-go (nothing regresses on it) and `values` is ignored.


def _gae(scores, kl, mask, values, kl_coef, group_size, gamma, lam, whiten_advantages, all_sum):
    adv, returns = gae(token_rewards(kl, scores, mask, kl_coef), values, mask, gamma, lam)
    return (whiten(adv, mask, all_sum=all_sum) if whiten_advantages else adv), returns


def _shaped(shape: Callable[[torch.Tensor, int], torch.Tensor] | None, whitened: bool):
    def estimate(scores, kl, mask, values, kl_coef, group_size, gamma, lam, whiten_advantages, all_sum):
        s = shape(scores, group_size) if shape is not None else scores.float()
        returns = reward_to_go(token_rewards(kl, s, mask, kl_coef), mask, gamma)
        return (whiten(returns, mask, all_sum=all_sum) if whitened else returns), returns

    return estimate


def _centre(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    return group_advantages(scores, group_size, scale=False)


@dataclass(frozen=True)
class Estimator:
    fn: Callable
    critic: bool  # learns a value function (ppo.critic, vf_coef, ... apply)
    grouped: bool  # needs samples_per_prompt >= 2 answers per prompt, adjacent
    help: str


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae, True, False, "GAE with a learned critic (classic PPO)"),
    "group_norm": Estimator(_shaped(group_advantages, False), False, True, "GRPO's group-normalised score"),
    "rloo": Estimator(_shaped(leave_one_out, False), False, True, "score minus the leave-one-out mean"),
    "reinforce_pp": Estimator(_shaped(None, True), False, False, "REINFORCE++: globally whitened returns"),
    "reinforce_pp_baseline": Estimator(
        _shaped(_centre, True), False, True, "REINFORCE++ with the group mean subtracted first"
    ),
}


def estimate(
    name: str,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    all_sum: AllSum = _local,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T), of estimator `name` (see the table above).

    scores (B,): sequence scores; kl (B, T): per-token KL estimates; values (B, T): the critic's
    (gae only). `whiten_advantages` applies to gae; reinforce_pp* always whiten, rloo and
    group_norm never (their baselines already centre them).

    >>> kl, m = torch.zeros(4, 2), torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])
    >>> estimate("rloo", torch.tensor([1.0, 0.0, 2.0, 2.0]), kl, m, group_size=2)[0].tolist()
    [[1.0, 1.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    est = ESTIMATORS[name]
    if est.grouped and group_size < 2:
        raise ValueError(f"advantage {name!r} needs at least 2 answers per prompt (got {group_size})")
    if est.critic and values is None:
        raise ValueError(f"advantage {name!r} needs the critic's values")
    m = mask.float()
    adv, returns = est.fn(
        scores.float(), kl.float() * m, m, values, kl_coef, group_size, gamma, lam, whiten_advantages, all_sum
    )
    return adv * m, returns * m
