"""The reference policy of DPO, GRPO and PPO: one mechanism, two forms.

    adapters (LoRA, QLoRA, ...)   the policy itself with its adapter switched off: no second copy
    full fine-tuning              a frozen copy of the starting model (eval mode, no grad, no dropout)

`reference_context(policy, frozen)` gives `(context manager, model)` to run the reference under;
`load_frozen` loads the frozen copy from a model dir (an adapter dir is merged into its base).
PPO's lean layout reaches the same two forms through its role switch (`Roles.use("ref")`: a frozen
"ref" adapter, or adapters disabled) and loads its separate-layout copy with `load_frozen`.
"""

from __future__ import annotations

import contextlib


def reference_context(policy, frozen=None):
    """`(context manager, model)` that give reference log-probs: the frozen copy as it is, else the
    policy (a `LogprobModel` over a peft model) with its adapter disabled."""
    if frozen is not None:
        return contextlib.nullcontext(), frozen
    return policy.lm.disable_adapter(), policy


def describe(frozen) -> str:
    return "frozen copy" if frozen is not None else "adapter disabled"


def load_full(path: str, dtype, device, mcfg):
    """A full causal LM from a model dir, or an adapter dir merged into its base."""
    from chatforge.models.adapters import is_adapter_dir, load_adapter_model
    from chatforge.models.load import load_model

    if is_adapter_dir(path):
        return load_adapter_model(path, dtype=dtype, device=device).merge_and_unload()
    return load_model(
        path,
        dtype=dtype,
        device=device,
        trust_remote_code=mcfg.trust_remote_code,
        attn_implementation=mcfg.attn_implementation,
    )


def load_frozen(path: str, dtype, device, mcfg):
    """The frozen copy: a `LogprobModel` in eval mode, no grad, dropout off."""
    from chatforge.models.heads import disable_dropout
    from chatforge.models.logprobs import LogprobModel

    lm = load_full(path, dtype, device, mcfg)
    lm.eval().requires_grad_(False)
    disable_dropout(lm)
    return LogprobModel(lm)


def copy_frozen(model):
    """A frozen deep copy of a model already in memory (DPO: the policy before its first step)."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)
