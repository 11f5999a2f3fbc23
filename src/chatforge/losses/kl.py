"""Per-token KL estimators between the policy and the reference, from sampled-token log-probs.

With r = ref_logp - logp for tokens sampled from the policy (Schulman, "Approximating KL"):

    k1 = -r                  unbiased, can be negative per token, low variance in the sum
    k2 = r^2 / 2             biased, always >= 0
    k3 = (e^r - 1) - r       unbiased and always >= 0 (GRPO's choice in the loss)

    >>> import torch
    >>> logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.5]])
    >>> kl_estimate(logp, ref, "k1").tolist()
    [[-0.0, -0.5]]
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate, same shape as `logp` (B, T); fp32."""
    r = ref_logp.float() - logp.float()
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r.square()
    if kind == "k3":
        # clamp keeps exp finite when the two policies drift far apart on a rare token
        r = r.clamp(max=20.0)
        return torch.expm1(r) - r
    raise ValueError(f"unknown KL estimator {kind!r}; known: {', '.join(KL_KINDS)}")
