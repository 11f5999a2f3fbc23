"""Rollout -> experience for PPO: sample, score, then everything the update needs, computed once.

    rollout     the actor samples a response per prompt (rl.generate, KV cache, left padding);
                the reward (rule functions and/or a reward model) scores each; scores are
                penalised when the response never stopped (ppo.missing_eos_penalty) and clipped
                to +-ppo.score_clip
    experience  no-grad forward passes by the training path: actor log-probs (old_logp),
                reference log-probs, critic values; per-token rewards
                    r_t = -kl_coef * KL_t            (KL estimate k1 or k3 of actor vs reference)
                    r_T += score                     (at the last response token)
                then an advantage estimator (`rl.advantages`, `ppo.advantage`): GAE(gamma, lambda)
                with the critic's values (whitened over the rollout), or a critic-free one
                (rloo, group_norm, reinforce_pp, reinforce_pp_baseline) over the
                `ppo.samples_per_prompt` answers sampled per prompt.

GRPO's rollout (`group_rollout`) is the short form: sample, score, and group advantages per answer
(reward minus its prompt's mean, over the group std), no per-token experience.

Reward-model scores are normalised with the statistics the reward stage saved (`ModelReward`).
Shapes are documented on `chatforge.rl.types.Rollout` and `Experience`.
"""

from __future__ import annotations

import contextlib
import time

import torch

from chatforge.rl.advantages import token_rewards  # noqa: F401  (re-exported: its old home)
from chatforge.rl.types import Experience, Rollout


def sample(roles, prompts, gen_cfg, batch_size: int | None = None, row_seeds: list[int] | None = None):
    """The actor's responses to `prompts` (PromptItem list) -> `rl.generate.Generated`; `row_seeds`
    gives each row its own random draws (`generate.seed_per_row`)."""
    with roles.use("actor"):
        return sample_from(roles.policy.lm, roles.tokenizer, prompts, gen_cfg, batch_size, row_seeds)


def sample_from(lm, tokenizer, prompts, gen_cfg, batch_size: int | None = None, row_seeds=None):
    """`lm`'s responses to `prompts` under `gen_cfg` (its LoRA folded in for sampling when
    `generate.merge_lora` says so) -> `rl.generate.Generated`."""
    from chatforge.models.adapters import merge_for_generation, sampling_model
    from chatforge.rl.generate import generate

    merge = merge_for_generation(gen_cfg.merge_lora, next(lm.parameters()).device)
    with sampling_model(lm, merge) as sampler:
        return generate(
            sampler,
            tokenizer,
            [p.ids for p in prompts],
            gen_cfg.max_new_tokens,
            gen_cfg.temperature,
            gen_cfg.top_p,
            gen_cfg.top_k,
            batch_size=batch_size or None,
            row_seeds=row_seeds,
        )


def group_rollout(
    lm,
    tokenizer,
    group,
    scorer,
    gen_cfg,
    group_size: int,
    scale_rewards: bool = True,
    batch_size: int | None = None,
    row_seeds: list[int] | None = None,
):
    """GRPO's rollout: one answer per entry of `group` (the prompts, each repeated `group_size` times,
    adjacent) sampled from `lm`, scored, and turned into group advantages.

    Returns (Generated, rewards (B,), per-function reward means, advantages (B,), timings).
    """
    from chatforge.rl.advantages import group_advantages

    t0 = time.perf_counter()
    gen = sample_from(lm, tokenizer, group, gen_cfg, batch_size, row_seeds)
    t1 = time.perf_counter()
    rewards, parts = scorer(group, gen.texts)
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    adv = group_advantages(rewards_t, group_size, scale=scale_rewards)
    times = {"time/generate": round(t1 - t0, 3), "time/score": round(time.perf_counter() - t1, 3)}
    return gen, rewards_t, parts, adv, times


def shape_scores(
    raw: torch.Tensor, stopped: torch.Tensor, score_clip: float = 0.0, missing_eos_penalty: float = 0.0
) -> torch.Tensor:
    """Scores (B,) after the missing-EOS penalty and clipping to +-score_clip (0 = no clip).

    >>> shape_scores(torch.tensor([3.0, 0.5]), torch.tensor([True, False]), 2.0, 1.0).tolist()
    [2.0, -0.5]
    """
    scores = raw.float() - missing_eos_penalty * (~stopped.bool()).float()
    if score_clip:
        scores = scores.clamp(-score_clip, score_clip)
    return scores


def score(roles, scorer, prompts, gen, score_clip: float = 0.0, missing_eos_penalty: float = 0.0):
    """(Rollout, per-function reward means) for generated responses (`scorer`: `rl.rewards.Scorer`)."""
    with roles.use("reward"):
        raw, parts = scorer(prompts, gen.texts)
    raw_t = torch.tensor(raw, dtype=torch.float32)
    stopped = gen.stopped.cpu()
    rollout = Rollout(
        gen.prompt_ids,
        gen.prompt_mask,
        gen.response_ids,
        gen.response_mask,
        stopped,
        shape_scores(raw_t, stopped, score_clip, missing_eos_penalty),
        raw_t,
        gen.texts,
        gen.tokens_per_s,
    )
    return rollout, parts


def branched_inputs(
    prompt_ids, prompt_mask, response_ids, response_mask, width: int, pad_to_multiple_of: int | None = None
) -> dict | None:
    """Completions (prompts (b, P) left-padded, responses (b, R) right-padded) as branched rows: each
    run of adjacent completions with the same prompt becomes one row, the prompt once and the
    responses after it (`data.collate.collate_branches`), plus where each completion's response
    tokens sit: `response_row` (b,), `response_col` (b, width) into the (G, T-1) log-probs. None when
    a response is empty (such a micro-batch keeps plain rows)."""
    from chatforge.data.collate import collate_branches

    prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
    lengths = response_mask.sum(1).tolist()
    if not all(lengths):
        return None
    groups, row_of, starts = [], [], []
    for prompt, ids, n in zip(prompts, response_ids, lengths):
        if not groups or groups[-1][0] != prompt:
            groups.append((prompt, []))
            at = len(prompt)
        groups[-1][1].append(ids[:n].tolist())
        row_of.append(len(groups) - 1)
        starts.append(at)
        at += n
    batch = collate_branches(groups, pad_id=0, pad_to_multiple_of=pad_to_multiple_of)
    cols = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, (start, n) in enumerate(zip(starts, lengths)):
        cols[i, :n] = torch.arange(start - 1, start - 1 + n)  # log-probs[t] are those of token t+1
    batch.pop("last")
    batch["target_mask"] = batch["branch"] > 0
    batch["response_row"] = torch.tensor(row_of)
    batch["response_col"] = cols
    return batch


def response_view(per_position: torch.Tensor, batch: dict) -> torch.Tensor:
    """(b, w) entries of a per-position tensor (rows, T-1) at each completion's response tokens
    (w = batch["response_mask"].shape[1]): the last w columns of plain prompt+response rows, or the
    `branched_inputs` columns of branched rows."""
    if "response_row" in batch:
        return per_position[batch["response_row"][:, None], batch["response_col"]]
    return per_position[:, -batch["response_mask"].shape[1] :]


def experience_batch(exp: Experience, rows, device=None, pad_to_multiple_of=None, branched: bool = False):
    """Rows `rows` of an experience as one micro-batch: `Experience.batch`, or with `branched` the
    rows that share a prompt as one branched row each (`branched_inputs`), the per-token targets
    (old_logp, advantages, ...) unchanged."""
    if not branched:
        return exp.batch(rows, device, pad_to_multiple_of)
    index = torch.as_tensor(rows, dtype=torch.long)
    resp = exp.response_mask.shape[1]
    prompt = exp.input_ids.shape[1] - resp
    rmask = exp.response_mask[index]
    width = max(int(rmask.sum(1).max()), 1)
    ids, mask = exp.input_ids[index], exp.attention_mask[index]
    batch = branched_inputs(
        ids[:, :prompt], mask[:, :prompt], ids[:, prompt:], rmask, width, pad_to_multiple_of
    )
    if batch is None:
        return exp.batch(rows, device, pad_to_multiple_of)
    batch["response_mask"] = rmask[:, :width]
    for name in ("old_logp", "old_values", "advantages", "returns"):
        batch[name] = getattr(exp, name)[index][:, :width]
    return {k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in batch.items()}


def _forward_all(
    empty: Experience,
    fn,
    batch_size: int,
    device,
    width: int,
    n_out: int = 1,
    multiple: int | None = None,
    branched: bool = False,
):
    """Run fn(micro_batch) -> n_out tensors (b, w) over the rollout in micro-batches; gather each
    into (B, width) fp32 on CPU (a tuple when n_out > 1)."""
    outs = [torch.zeros(len(empty), width, dtype=torch.float32) for _ in range(n_out)]
    for s in range(0, len(empty), batch_size):
        rows = list(range(s, min(s + batch_size, len(empty))))
        got = fn(experience_batch(empty, rows, device, multiple, branched))
        for out, vals in zip(outs, got if n_out > 1 else (got,)):
            out[rows, : vals.shape[1]] = vals.float().cpu()
    return tuple(outs) if n_out > 1 else outs[0]


@torch.no_grad()
def make_experience(
    roles,
    rollout: Rollout,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    batch_size: int = 8,
    device=None,
    autocast=None,
    pad_to_multiple_of: int | None = None,
    advantage: str = "gae",
    group_size: int = 1,
    all_sum=None,
    branched: bool = False,
) -> tuple[Experience, dict[str, float]]:
    """(Experience, stats) for a scored rollout; forward passes in micro-batches of `batch_size`
    (widths rounded as `Experience.batch` does with `pad_to_multiple_of`; with `branched`, the
    answers to one prompt in one branched row, the prompt computed once: `experience_batch`).
    `advantage` names an estimator of `rl.advantages.ESTIMATORS`; the group ones read the
    `group_size` answers to each prompt as adjacent rows; `all_sum` sums a tensor over processes
    (global whitening)."""
    from chatforge.losses.kl import kl_estimate
    from chatforge.losses.reduce import masked_mean
    from chatforge.rl.advantages import ESTIMATORS, estimate

    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1).cpu()
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], 1).cpu()
    rmask = rollout.response_mask.cpu()
    B, R = rmask.shape
    zeros = torch.zeros(B, R)
    exp = Experience(
        ids,
        mask,
        (mask.cumsum(1) - 1).clamp(min=0),
        rmask,
        zeros,
        zeros,
        zeros,
        zeros,
        zeros,
        zeros,
        zeros,
        rollout.scores.float().cpu(),
    )
    amp = autocast or contextlib.nullcontext

    model = roles.model()

    def inputs(b):
        kw = {"prev": b["prev"]} if "prev" in b else {}
        return (b["input_ids"], b["attention_mask"], b["position_ids"], b["target_mask"]), kw

    def logps_and_values(b):  # the same forward path as the loss (actor, then critic or value head)
        args, kw = inputs(b)
        with amp():
            lp, _, v = model(*args, with_entropy=False, **kw)
        return response_view(lp, b), response_view(v, b)

    def ref_logps(b):
        args, kw = inputs(b)
        with amp():
            lp, _ = roles.ref_policy(*args, **kw)
        return response_view(lp, b)

    exp.old_logp, exp.old_values = _forward_all(
        exp, logps_and_values, batch_size, device, R, 2, pad_to_multiple_of, branched
    )
    exp.old_values = exp.old_values * rmask
    with roles.use("ref"):
        exp.ref_logp = _forward_all(exp, ref_logps, batch_size, device, R, 1, pad_to_multiple_of, branched)
    exp.kl = kl_estimate(exp.old_logp, exp.ref_logp, kl_estimator) * rmask
    if not ESTIMATORS[advantage].critic:
        exp.old_values = torch.zeros_like(exp.old_values)  # no critic: nothing to regress, nothing to log
    exp.rewards = token_rewards(exp.kl, exp.scores, rmask, kl_coef)
    exp.advantages, exp.returns = estimate(
        advantage,
        exp.scores,
        exp.kl,
        rmask,
        exp.old_values,
        kl_coef,
        group_size,
        gamma,
        lam,
        whiten_advantages,
        **({"all_sum": all_sum} if all_sum is not None else {}),
    )
    seq_kl = exp.kl.sum(1)
    lengths = rmask.sum(1).float()
    stats = {
        "reward": float(rollout.scores.mean()),
        "reward_std": float(rollout.scores.std()) if B > 1 else 0.0,
        "reward_raw": float(rollout.raw_scores.mean()),
        "kl": float(seq_kl.mean()),
        "kl_per_token": float(masked_mean(exp.kl, rmask)),
        "non_score_reward": float((-kl_coef * seq_kl).mean()),
        "response_length": float(lengths.mean()),
        "stopped_frac": float(rollout.stopped.float().mean()),
        "value_mean": float(masked_mean(exp.old_values, rmask)),
        "return_mean": float(masked_mean(exp.returns, rmask)),
    }
    return exp, stats
