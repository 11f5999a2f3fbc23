"""How long a run trains and in what order: optimizer steps from `train.max_steps` or
`train.epochs` (`steps_for`), each epoch's shuffled example order (`epoch_order`), and the learning
rate's multiplier per step (`lr_lambda`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from chatforge.errors import ChatforgeError


def lr_lambda(scheduler: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at a step: linear warmup, then cosine/linear decay or constant.

    >>> f = lr_lambda("linear", 2, 10)
    >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress

    return f


def steps_for(n_items: int, tcfg, world: int = 1) -> int:
    """Optimizer steps for `train.max_steps` or `train.epochs` over n_items examples."""
    per_step = tcfg.batch_size * tcfg.grad_accum * world
    if n_items < per_step:
        raise ChatforgeError(
            f"only {n_items} training examples, fewer than one global batch of {per_step} "
            f"(train.batch_size x train.grad_accum x processes): add data or lower them"
        )
    if tcfg.max_steps:
        return tcfg.max_steps
    return max(1, math.ceil(tcfg.epochs * (n_items // per_step)))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of an epoch; the same on every rank and after a resume."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()
