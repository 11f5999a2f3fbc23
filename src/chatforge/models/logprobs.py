"""Per-token log-probs without materialising full-vocabulary fp32 logits for the whole batch.

Language-model training spends much of its memory on the (batch, seq, vocab) logits. chatforge runs
the backbone, keeps only the hidden states at positions that carry a target (assistant tokens in SFT,
response tokens in RL), and applies the LM head to them in chunks. When the head is frozen (every
adapter method) a fused autograd function computes the gradient for the hidden states inside the
chunk loop, so nothing of size vocab is kept for backward. A trainable head (full fine-tuning)
recomputes each chunk in backward instead.

`LogprobModel` wraps a causal LM (composition) so the same forward path serves rollout and training,
and DDP/FSDP see one module whose `forward` does it all.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _FrozenHeadLogprob(torch.autograd.Function):
    """logp[n] = log_softmax(hidden[n] @ W.T / T)[target[n]], gradient for `hidden` only."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32) if with_entropy else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = (hidden[s:e] @ weight.T).float().div_(temperature)
            lse = logits.logsumexp(-1, keepdim=True)
            tgt = targets[s:e, None]
            logp[s:e] = (logits.gather(1, tgt) - lse).squeeze(1)
            if with_entropy or grad_hidden is not None:
                probs = (logits - lse).exp_()
                if with_entropy:
                    entropy[s:e] = lse.squeeze(1) - (probs * logits).sum(-1)
                if grad_hidden is not None:
                    # d logp / d logits = onehot - softmax
                    probs.scatter_add_(1, tgt, probs.new_full(tgt.shape, -1.0)).neg_()
                    grad_hidden[s:e] = (probs.to(weight.dtype) @ weight).div_(temperature)
        ctx.save_for_backward(grad_hidden)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_logp[:, None].to(grad_hidden.dtype), None, None, None, None, None


def _chunk_logprob(hidden, weight, bias, targets, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)


def _chunk_entropy(hidden, weight, bias, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    return torch.distributions.Categorical(logits=logits).entropy()


def head_logprobs(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `targets` (N,) under `head(hidden)` for hidden (N, H); returns fp32 (N,) [+ entropy].

    Peak extra memory is one (chunk_size, vocab) fp32 block, whatever N is.
    """
    weight, bias = head.weight, head.bias
    if not weight.requires_grad and bias is None:
        return _FrozenHeadLogprob.apply(hidden, weight, targets, temperature, chunk_size, with_entropy)
    logps, ents = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            logps.append(checkpoint(_chunk_logprob, h, weight, bias, t, temperature, use_reentrant=False))
        else:
            logps.append(_chunk_logprob(h, weight, bias, t, temperature))
        if with_entropy:
            with torch.no_grad():
                ents.append(_chunk_entropy(h, weight, bias, temperature))
    cat = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    return cat, (torch.cat(ents) if with_entropy and ents else None)


def _unwrap_peft(lm):
    """(transformers model, uses virtual tokens) for a plain or peft-wrapped causal LM."""
    peft_type = None
    if hasattr(lm, "peft_config") and hasattr(lm, "get_base_model"):
        peft_type = lm.peft_config[lm.active_adapter].peft_type.value
        if peft_type == "LORA":
            return lm.get_base_model(), False
        return lm, True
    return lm, False


def split_backbone(lm):
    """(decoder, head) when the fast hidden-state path applies to `lm`, else None."""
    base, virtual = _unwrap_peft(lm)
    if virtual:
        return None  # prefix/prompt tuning inject state inside PeftModel.forward
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None  # the head output is post-processed; take the plain path
    head = base.get_output_embeddings()
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or not isinstance(head, nn.Linear) or decoder is base:
        return None
    return decoder, head


def token_logprobs(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    return_hidden: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Log-probs of each next token under a causal LM.

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens; None for packed rows (position_ids then restart).
        position_ids: (B, T) or None.
        target_mask: (B, T) bool, True where input_ids[b, t] is a target whose log-prob is wanted
            (its first column is ignored: nothing predicts the first token). None = every token.
    Returns:
        logps (B, T-1) fp32: logps[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]), 0 off-target;
        entropy (B, T-1) fp32 of the predictive distribution at the same positions, or None;
        with return_hidden, also the last hidden states (B, T-1, H) those predictions are read from
        (a value head on the policy uses them: PPO's `ppo.critic=head`).
    """
    targets = input_ids[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool) if target_mask is None else target_mask[:, 1:].bool()
    parts = split_backbone(lm)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, :-1]
        lp, ent = head_logprobs(hidden[mask], head, targets[mask], temperature, chunk_size, with_entropy)
    else:
        kw = {"position_ids": position_ids} if position_ids is not None else {}
        out = lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=return_hidden,
            **kw,
        )
        width = input_ids.shape[1]
        logits = out.logits[:, -width:][:, :-1]  # prompt tuning prepends virtual tokens
        hidden = out.hidden_states[-1][:, -width:][:, :-1] if return_hidden else None
        sel = logits[mask].float() / temperature
        lp = sel.gather(1, targets[mask][:, None]).squeeze(1) - sel.logsumexp(-1)
        ent = torch.distributions.Categorical(logits=sel.detach()).entropy() if with_entropy else None
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=input_ids.device)
    logps = logps.masked_scatter(mask, lp)
    entropy = None
    if ent is not None:
        entropy = torch.zeros_like(logps).masked_scatter(mask, ent)
    return (logps, entropy, hidden) if return_hidden else (logps, entropy)


class LogprobModel(nn.Module):
    """A causal LM whose forward returns per-token log-probs (see `token_logprobs`).

    Composition, not subclassing: `.lm` is the transformers (or peft) model, saved and loaded as is.
    `temperature` divides the logits: RL sets it to the sampling temperature, so the log-probs are
    those of the distribution the rollouts were drawn from and the PPO ratio is a true importance
    ratio (greedy decoding of the tempered policy is unchanged).
    """

    def __init__(self, lm, temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self.temperature = temperature

    def forward(self, input_ids, attention_mask=None, position_ids=None, target_mask=None, **kw):
        kw.setdefault("temperature", self.temperature)
        return token_logprobs(self.lm, input_ids, attention_mask, position_ids, target_mask, **kw)
