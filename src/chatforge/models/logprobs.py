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
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 23  # logits per chunk of the head: 32 MB in fp32
# The last chunk's rows are rounded up to a multiple of this: kernels (oneDNN on CPU) are built and
# cached per shape and never freed, so a free row count would add one set per step.
ROW_BUCKET = 16


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
            h, tgt = hidden[s:e], targets[s:e, None]
            extra = -(e - s) % ROW_BUCKET
            if extra:  # the last chunk: zero rows up to a bucket, so its kernels come from a few shapes
                h, tgt = F.pad(h, (0, 0, 0, extra)), F.pad(tgt, (0, 0, 0, extra))
            logits = (h @ weight.T).float()
            if temperature != 1.0:
                logits.div_(temperature)
            lse = logits.logsumexp(-1, keepdim=True)
            logp[s:e] = (logits.gather(1, tgt) - lse)[: e - s].squeeze(1)
            if with_entropy or grad_hidden is not None:
                logq = logits.sub_(lse)  # in place: every log-prob of the chunk
                probs = logq.exp()
                if with_entropy:  # -sum p log p as a batched dot product: no third (chunk, vocab) block
                    entropy[s:e] = -(probs[:, None, :] @ logq[:, :, None]).view(-1)[: e - s]
                del logits, logq
                if grad_hidden is not None:
                    # d logp / d logits = onehot - softmax
                    probs.scatter_add_(1, tgt, probs.new_full(tgt.shape, -1.0)).neg_()
                    grad_hidden[s:e] = (probs.to(weight.dtype) @ weight)[: e - s].div_(temperature)
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
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `targets` (N,) under `head(hidden)` for hidden (N, H); returns fp32 (N,) [+ entropy].

    Peak extra memory is two (chunk_size, vocab) fp32 blocks, whatever N is; the default chunk keeps
    a block near 32 MB (160 rows of a 49k vocabulary), which on CPU is also no slower than larger
    blocks (measured: 860 rows through a 49k head, forward + backward, 0.36-0.46 s at 64-256 rows
    per chunk against 0.50-0.60 s and 0.3-0.5 GB more at 1024).
    """
    weight, bias = head.weight, head.bias
    chunk_size = chunk_size or max(ROW_BUCKET, CHUNK_ELEMENTS // weight.shape[0] // ROW_BUCKET * ROW_BUCKET)
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


def model_attention_mask(lm, mask: torch.Tensor | None) -> torch.Tensor | None:
    """`mask` as the model's attention takes it: a 4D boolean mask (True = attend) becomes additive
    (0 / dtype min) unless the model runs SDPA, which takes booleans; 2D masks pass unchanged."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    base, _ = _unwrap_peft(lm)
    if getattr(base.config, "_attn_implementation", "eager") == "sdpa":
        return mask
    dtype = next(base.parameters()).dtype
    if not dtype.is_floating_point:  # 4-bit storage: attention runs in the compute dtype
        dtype = torch.float32
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )


def last_hidden_states(lm, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """The last layer's hidden states (B, T, H) of `lm` (plain or peft), without the LM head."""
    attention_mask = model_attention_mask(lm, attention_mask)
    parts = split_backbone(lm)
    if parts is not None:
        out = parts[0](
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state
    kw = {"position_ids": position_ids} if position_ids is not None else {}
    out = lm(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, **kw
    )
    return out.hidden_states[-1][:, -input_ids.shape[1] :]  # prompt tuning prepends virtual tokens


@torch.no_grad()
def branches_supported(lm) -> bool:
    """Whether `lm` computes branched rows (`collate_branches`) exactly as separate rows.

    A probe of two short branches on a shared prefix, compared with the same sequences run one row
    each. Models that build their own position biases from a 2D mask (BLOOM's ALiBi), that do not
    take a 4D mask, or prepend virtual tokens (prefix/prompt tuning) fail it and keep separate rows.
    """
    from chatforge.data.collate import collate_branches

    base, virtual = _unwrap_peft(lm)
    if virtual:
        return False
    prefix, branches = [3, 4, 5, 6, 7, 8], [[9, 10, 11], [12, 13]]
    device = next(base.parameters()).device
    batch = {
        k: v.to(device)
        for k, v in collate_branches([(prefix, branches)], pad_id=0).items()
        if torch.is_tensor(v)
    }
    was_training = lm.training
    lm.eval()
    try:
        hidden = last_hidden_states(lm, batch["input_ids"], batch["attention_mask"], batch["position_ids"])[0]
        for k, branch in enumerate(branches, start=1):
            alone = last_hidden_states(lm, torch.tensor([prefix + branch], device=device))[0].float()
            got = torch.cat([hidden[: len(prefix)], hidden[batch["branch"][0] == k]]).float()
            tol = 1e-4 if hidden.dtype == torch.float32 else 2e-2
            if not torch.isfinite(got).all() or (got - alone).abs().max() > tol * alone.abs().max():
                return False
    except Exception:  # noqa: BLE001  any failure of the probe means: keep separate rows
        return False
    finally:
        lm.train(was_training)
    return True


def predecessors(states: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """(B, T-1, ...) states that predict tokens 1..T-1: states[:, :-1] for plain rows, the states at
    `prev` for branched rows (a branch's first token is predicted from the prefix's end)."""
    if prev is None:
        return states[:, :-1]
    return states[torch.arange(states.shape[0], device=states.device)[:, None], prev[:, 1:]]


def token_logprobs(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    return_hidden: bool = False,
    prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Log-probs of each next token under a causal LM.

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens; None for packed rows (position_ids then restart);
            or (B, 1, T, T) bool for rows whose tokens branch (`data.collate.collate_branches`).
        position_ids: (B, T) or None.
        target_mask: (B, T) bool, True where input_ids[b, t] is a target whose log-prob is wanted
            (its first column is ignored: nothing predicts the first token). None = every token.
        prev: (B, T) or None: the position whose hidden state predicts token t (None = t-1, a
            plain row); branched rows give it (a branch's first token is read at the prefix's end).
    Returns:
        logps (B, T-1) fp32: logps[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]), 0 off-target;
        entropy (B, T-1) fp32 of the predictive distribution at the same positions, or None;
        with return_hidden, also the last hidden states (B, T-1, H) those predictions are read from
        (`predecessors`; a value head on the policy uses them: PPO's `ppo.critic=head`).
    """
    targets = input_ids[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool) if target_mask is None else target_mask[:, 1:].bool()
    attention_mask = model_attention_mask(lm, attention_mask)

    def read(states: torch.Tensor) -> torch.Tensor:
        """The states (B, T, ...) that predict each target, flattened to (N, ...)."""
        if prev is None:
            return states[:, :-1][mask]
        return states[mask.nonzero(as_tuple=True)[0], prev[:, 1:][mask]]

    parts = split_backbone(lm)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        lp, ent = head_logprobs(read(hidden), head, targets[mask], temperature, chunk_size, with_entropy)
        hidden = predecessors(hidden, prev)
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
        logits = out.logits[:, -width:]  # prompt tuning prepends virtual tokens
        hidden = predecessors(out.hidden_states[-1][:, -width:], prev) if return_hidden else None
        sel = read(logits).float() / temperature
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
