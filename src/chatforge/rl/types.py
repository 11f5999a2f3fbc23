"""Typed containers for PPO: a rollout (what the actor said and what it scored) and its experience.

    prompts -> generate -> Rollout -> (log-probs, values, KL, GAE) -> Experience -> minibatches

Shapes: B sequences, P prompt positions (left-padded), R response positions (right-padded).
Every per-token field of `Experience` is aligned to response tokens: column t belongs to the t-th
generated token, and `response_mask` (B, R) marks the real ones (up to and including the stop
token). Only torch is imported here, so users can build on these types without the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Rollout:
    """Sampled responses and their sequence scores.

    prompt_ids: (B, P) long, left-padded prompt tokens; prompt_mask: (B, P) 1 on real tokens.
    response_ids: (B, R) long, right-padded responses; response_mask: (B, R) 1 on real tokens.
    stopped: (B,) bool, True where the response ended with a stop token (not the length limit).
    scores: (B,) fp32 sequence scores after clipping and the missing-EOS penalty.
    raw_scores: (B,) fp32 scores as the reward returned them (before clipping and penalty).
    texts: the decoded responses. tokens_per_s: generation speed.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    stopped: torch.Tensor
    scores: torch.Tensor
    raw_scores: torch.Tensor
    texts: list[str]
    tokens_per_s: float = 0.0


@dataclass
class Experience:
    """A rollout turned into PPO training targets (everything detached, fp32 unless noted).

    input_ids: (B, P+R) long, prompt then response; attention_mask: (B, P+R) 1 on real tokens;
    position_ids: (B, P+R) long, counting real tokens only (as generation did under left padding).
    response_mask: (B, R) 1 on response tokens that count.
    old_logp: (B, R) log-probs of the response tokens under the rollout policy (the actor).
    ref_logp: (B, R) the same under the reference policy.
    old_values: (B, R) critic values of the state before each response token.
    kl: (B, R) per-token KL estimate (actor vs reference) that entered the rewards.
    rewards: (B, R) per-token rewards: -kl_coef * kl, plus the score at the last response token.
    advantages: (B, R) GAE advantages (whitened over the rollout when asked).
    returns: (B, R) GAE returns, the critic's regression targets.
    scores: (B,) the sequence scores (as in the rollout).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows, device=None, pad_to_multiple_of: int | None = None) -> dict:
        """The rows `rows` as a training micro-batch, with columns that are padding in every row dropped.

        Returns input_ids/attention_mask/position_ids/target_mask (b, W) and response_mask,
        old_logp, old_values, advantages, returns (b, w) where w is the longest response among
        the rows and W = the prompt columns in use + w. With `pad_to_multiple_of`, W is rounded up
        to a multiple of it where the rollout has the padding columns (response side first, then
        prompt side): kernels are built and cached per shape. `num_tokens` counts real tokens.
        """
        from chatforge.data.collate import bucket_span

        rows = torch.as_tensor(rows, dtype=torch.long)
        resp_width = self.response_mask.shape[1]
        prompt_width = self.input_ids.shape[1] - resp_width
        rmask = self.response_mask[rows]
        mask = self.attention_mask[rows]
        width = max(int(rmask.sum(1).max()), 1)
        lo = int(mask[:, :prompt_width].argmax(1).min()) if prompt_width else 0
        lo, width = bucket_span(lo, prompt_width, width, resp_width, pad_to_multiple_of)
        cols = slice(lo, prompt_width + width)
        target = torch.zeros_like(mask)
        target[:, prompt_width:] = rmask
        out = {
            "input_ids": self.input_ids[rows][:, cols],
            "attention_mask": mask[:, cols],
            "position_ids": self.position_ids[rows][:, cols],
            "target_mask": target[:, cols],
            "response_mask": rmask[:, :width],
            "num_tokens": int(mask.sum()),
        }
        for name in ("old_logp", "old_values", "advantages", "returns"):
            out[name] = getattr(self, name)[rows][:, :width]
        return {k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in out.items()}

    def to(self, device) -> Experience:
        return Experience(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
