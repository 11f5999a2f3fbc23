"""GRPO, RL without a critic: `chatforge grpo CONFIG.yaml [key=value ...]`.

Each step takes `grpo.prompts_per_step` prompts, samples `grpo.num_generations` answers to each
(batched, KV cache), scores them (rule functions and/or a reward model), and turns the scores into
advantages by comparing each answer with the others to its prompt (reward minus the group mean,
over the group std). The policy then takes `grpo.epochs_per_step` optimizer steps on the PPO
clipped loss with those per-sequence advantages, plus `grpo.beta` times the k3 KL to the reference
(the starting model: the adapter switched off with LoRA, a frozen copy with full fine-tuning; none
at all when beta is 0). `grpo.loss_aggregation` averages the token losses over every token of the
global batch (`token`, DAPO), per answer then over answers (`sequence`, the GRPO paper), or sums
them over a constant answers x generate.max_new_tokens (`dr_grpo`, Dr. GRPO; pair it with
`grpo.scale_rewards=false` for the paper's recipe).

    step:  prompts -> generate -> score -> group advantages -> [policy loss + beta * KL] x epochs

Learning batches hold a prompt once with its answers after it (`data.share_prompt`, a 4D mask keeps
the answers apart); `generate.seed_per_row` gives each answer its own random draws, so a run
samples the same answers whatever its generation batch size or number of processes.

Under `dist.strategy=fsdp2` (LoRA on a sharded frozen base) learning runs sharded and the rollout
decodes on the whole weights, gathered once per step and resharded after it
(`chatforge.train.dist.unsharded`): decoding is one small forward per token, and a sharded layer
all-gathers in every forward, so the ranks would have to decode in lock step (the same number of
forwards, whatever their answers' lengths) and pay an all-gather per layer per token. The same holds
under `dist.strategy=zero3` (LoRA; the parameters gathered once per rollout, DeepSpeed's per-module
hooks off while it decodes); under `zero2` every rank holds the whole model and decodes on it as it
is. Under ZeRO a rank's completions of a step must fit in one micro-batch (`train.batch_size`).

The rollout is `chatforge.rl.experience.group_rollout`; the outer loop, shared with PPO, is
`chatforge.train.rl_loop`: `train.max_steps` counts GRPO steps and `train.save_every` checkpoints
every N of them; a run stopped between steps (Ctrl-C, a reward function that raises) also
checkpoints its finished steps, so `train.resume=true` loses nothing. The shared `Trainer` does the
optimizer and accumulation (micro-batches of `train.batch_size` completions). Logged per step:
reward mean/std and per function, KL, clip fraction, response length, generation tokens/s and the
generate/score/learn time split. Sample completions
go to OUTPUT/samples.jsonl every `grpo.samples_every` steps.
"""

from __future__ import annotations

import contextlib
import json
import time
from functools import partial
from pathlib import Path

from chatforge.config import Config
from chatforge.rl.reference import reference_context


def grpo_loss(model, batch, normalizer, clip_eps: float, beta: float, reduction: str = "token"):
    """Clipped policy loss on one micro-batch of completions, plus beta * k3 KL to the reference.

    batch: input_ids/attention_mask/position_ids/target_mask (b, P+R), response_mask (b, R),
    advantages (b, 1), old_logp (b, R) or absent (one pass per step: the policy is the rollout
    policy, ratio 1 and the gradient of the plain policy gradient), ref_logp (b, R) when beta > 0.
    """
    from chatforge.losses.kl import kl_estimate
    from chatforge.losses.policy import ppo_policy_loss
    from chatforge.losses.reduce import masked_mean, masked_reduce

    rmask = batch["response_mask"]
    logp = response_logps(model, batch)
    old = batch.get("old_logp")
    old = logp.detach() if old is None else old
    loss, metrics = ppo_policy_loss(logp, old, batch["advantages"], rmask, clip_eps, reduction, normalizer)
    if beta:
        kl = kl_estimate(logp, batch["ref_logp"], "k3")
        loss = loss + beta * masked_reduce(kl, rmask, reduction, normalizer)
        metrics["kl"] = masked_mean(kl.detach(), rmask)
    return loss, metrics


def response_logps(model, batch):
    """Log-probs (b, R) of each completion's response tokens (0 past its end), from one forward of
    the micro-batch: prompt+response rows, or branched rows (a prompt once, its answers after it)."""
    from chatforge.rl.experience import response_view

    ids, mask, pos, target = (
        batch[k] for k in ("input_ids", "attention_mask", "position_ids", "target_mask")
    )
    kw = {"prev": batch["prev"]} if "prev" in batch else {}
    logps, _ = model(ids, mask, pos, target, **kw)
    return response_view(logps, batch)


# grpo.loss_aggregation -> the reduction mode of chatforge.losses.reduce
AGGREGATIONS = {"token": "token", "sequence": "sequence", "dr_grpo": "constant"}


def grpo_units(batch, reduction: str = "token", length: int = 0) -> int:
    """Units of one micro-batch; `length` is Dr. GRPO's constant (generate.max_new_tokens)."""
    from chatforge.losses.reduce import count_units

    return count_units(batch["response_mask"], reduction, length)


def sequence_logprobs(model, micro_batches, ctx=None) -> list:
    """No-grad response log-probs (b, R) per micro-batch, by the training forward path."""
    import torch

    out = []
    with torch.no_grad(), ctx or contextlib.nullcontext():
        for b in micro_batches:
            out.append(response_logps(model, b).float())
    return out


def micro_batches(
    gen, advantages, size: int, device, branched: bool = False, pad_to_multiple_of: int | None = None
) -> list[dict]:
    """Split a step's completions into training micro-batches of `size` completions: prompt+response
    rows, or with `branched` one row per prompt (`branched_inputs`); row widths rounded up to a
    multiple of `pad_to_multiple_of` where the rollout has the padding columns."""
    import torch

    from chatforge.data.collate import bucket_span
    from chatforge.rl.experience import branched_inputs
    from chatforge.rl.generate import sequence_inputs

    ids, mask, positions = sequence_inputs(gen)
    target = torch.cat([torch.zeros_like(gen.prompt_mask), gen.response_mask], 1)
    out = []
    for s in range(0, ids.shape[0], size):
        sl = slice(s, s + size)
        rmask = gen.response_mask[sl]
        width = max(int(rmask.sum(1).max()), 1)
        batch = None
        if branched:
            parts = (gen.prompt_ids[sl], gen.prompt_mask[sl], gen.response_ids[sl], rmask)
            batch = branched_inputs(*parts, width, pad_to_multiple_of)
        if batch is None:
            # drop columns that are padding in every row: prompt pads on the left, response pads on the right
            lo = int(gen.prompt_mask[sl].argmax(1).min())
            prompt_width = gen.prompt_ids.shape[1]
            # a few widths only: kernels are built and cached per shape
            lo, width = bucket_span(lo, prompt_width, width, gen.response_mask.shape[1], pad_to_multiple_of)
            cols = slice(lo, prompt_width + width)
            batch = {
                "input_ids": ids[sl, cols],
                "attention_mask": mask[sl, cols],
                "position_ids": positions[sl, cols],
                "target_mask": target[sl, cols],
                "num_tokens": int(mask[sl].sum()),
            }
        batch.update(response_mask=rmask[:, :width], advantages=advantages[sl, None])
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return out


def build_scorer(cfg: Config, items, device):
    """`rl.rewards.Scorer` of grpo.reward_functions and/or grpo.reward_model (weighted)."""
    from chatforge.data.prompts import require_answers
    from chatforge.errors import ConfigError
    from chatforge.rl.rewards import ModelReward, RuleRewards, Scorer

    g = cfg.grpo
    if not g.reward_functions and not g.reward_model:
        raise ConfigError("grpo needs a reward: set grpo.reward_functions and/or grpo.reward_model")
    rules = RuleRewards(g.reward_functions, g.reward_weights) if g.reward_functions else None
    if rules is not None and rules.needs_answers:
        require_answers(items, ", ".join(rules.needs_answers))
    model = None
    if g.reward_model:
        model = ModelReward.from_dir(g.reward_model, device=device, max_length=cfg.data.max_length)
    return Scorer(rules, model, g.reward_model_weight)


def load_reference(cfg: Config, device):
    """The frozen reference for full fine-tuning (None with adapters: switching them off is the reference)."""
    from chatforge.models.load import resolve_dtype
    from chatforge.rl.reference import load_frozen

    if cfg.grpo.beta == 0 or cfg.peft.method != "none":
        return None
    return load_frozen(
        cfg.model.path, resolve_dtype(cfg.model.dtype, device, full_finetune=False), device, cfg.model
    )


def check_zero_batch(strategy: str, world: int, completions: int, batch_size: int) -> None:
    """Under DeepSpeed ZeRO one optimizer step is one micro-batch (what is tested): a rank's
    completions must fit in one `train.batch_size`.

    >>> check_zero_batch("zero3", 2, 8, 8), check_zero_batch("fsdp2", 2, 16, 8)
    (None, None)
    """
    from chatforge.errors import ConfigError

    if strategy in ("zero2", "zero3") and world > 1 and completions > batch_size:
        raise ConfigError(
            f"dist.strategy={strategy} learns one micro-batch per step: set train.batch_size to at least "
            f"grpo.prompts_per_step x grpo.num_generations ({completions}), or use dist.strategy=fsdp2"
        )


def run(cfg: Config) -> str:
    from chatforge.errors import ConfigError
    from chatforge.models.heads import disable_dropout
    from chatforge.models.load import pick_device
    from chatforge.rl.experience import group_rollout
    from chatforge.rl.reference import describe
    from chatforge.train.common import build_policy, log, save_lm, share_prompt
    from chatforge.train.dist import unsharded
    from chatforge.train.loop import Trainer
    from chatforge.train.rl_loop import RLStage, load_prompts, run_loop, total_steps, world_size

    g, gen_cfg = cfg.grpo, cfg.generate
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one prompt file")
    if g.prompts_per_step < 1 or g.epochs_per_step < 1:
        raise ConfigError("grpo.prompts_per_step and grpo.epochs_per_step must be at least 1")
    check_zero_batch(
        cfg.dist.strategy, world_size(), g.prompts_per_step * g.num_generations, cfg.train.batch_size
    )
    items = load_prompts(cfg, "grpo")
    device = pick_device(cfg.train.device)
    scorer = build_scorer(cfg, items, device)
    policy, tok = build_policy(cfg, dropout=0.0)
    disable_dropout(policy.lm)
    ref = load_reference(cfg, device)
    # log-probs of the tempered distribution the completions are sampled from
    for m in (policy, ref):
        if m is not None:
            m.temperature = gen_cfg.temperature
    log("reference: " + ("none (grpo.beta=0)" if g.beta == 0 else describe(ref)))
    branched = share_prompt(cfg, policy.lm, "learning batches")
    steps = total_steps(cfg.train, len(items), g.prompts_per_step, world_size())
    trainer = Trainer(policy, cfg.train, steps * g.epochs_per_step, dist=cfg.dist)
    model = trainer.acc.unwrap_model(trainer.model)

    def step(rl_step, group, seeds, bar):  # rollout -> score -> group advantages -> learn
        # under fsdp2 and zero3 the rollout decodes on the whole weights, gathered once (dist.unsharded)
        with unsharded(trainer.model, cfg.dist.reshard_after_forward):
            gen, rewards_t, parts, adv, times = group_rollout(
                model.lm, tok, group, scorer, gen_cfg, g.num_generations, g.scale_rewards,
                g.generation_batch_size, seeds,
            )  # fmt: skip
        t2 = time.perf_counter()
        learned, first_ratio = learn(trainer, model, ref, gen, adv, cfg, bar, branched)
        times["time/learn"] = round(time.perf_counter() - t2, 3)
        metrics = {
            **learned,
            "grpo_step": rl_step + 1,
            "first_ratio": first_ratio,
            **reward_stats(trainer, rewards_t),
            **parts,
            "response_length": float(gen.response_mask.sum(1).float().mean()),
            "stopped_frac": float(gen.stopped.float().mean()),
            "gen_tokens_per_s": round(gen.tokens_per_s, 1),
            **times,
        }
        rewards = rewards_t.tolist()
        return metrics, partial(
            write_samples, prompts=group, texts=gen.texts, rewards=rewards, group_size=g.num_generations
        )

    stage = RLStage("grpo", g.prompts_per_step, g.num_generations, g.epochs_per_step, g.samples_every, step)
    run_loop(trainer, stage, items, steps, cfg.train, gen_cfg.seed_per_row)
    final = save_lm(trainer, trainer.model, tok)
    log(f"done: {final}")
    return str(final)


def learn(trainer, model, ref, gen, adv, cfg: Config, bar, branched: bool = False) -> tuple[dict, float]:
    """grpo.epochs_per_step optimizer steps on one rollout; returns (last step's metrics, first ratio).

    Reference log-probs (beta > 0) and, with several epochs, the rollout policy's log-probs are taken
    first by the same forward path and autocast as training, so the first ratio is 1.
    """
    g = cfg.grpo
    reduction = AGGREGATIONS[g.loss_aggregation]
    loss_fn = partial(grpo_loss, clip_eps=g.clip_eps, beta=g.beta, reduction=reduction)
    units_fn = partial(grpo_units, reduction=reduction, length=cfg.generate.max_new_tokens)
    micro = micro_batches(
        gen, adv, cfg.train.batch_size, trainer.acc.device, branched, cfg.data.pad_to_multiple_of
    )
    if g.beta:
        ctx, ref_model = reference_context(model, ref)
        with trainer.acc.autocast():
            for b, lp in zip(micro, sequence_logprobs(ref_model, micro, ctx)):
                b["ref_logp"] = lp
    if g.epochs_per_step > 1:
        with trainer.acc.autocast():
            for b, lp in zip(micro, sequence_logprobs(model, micro)):
                b["old_logp"] = lp
    learned, first_ratio = {}, 1.0
    for epoch in range(g.epochs_per_step):
        learned = trainer.train_step(micro, loss_fn, units_fn)
        if epoch == 0:  # on-policy: 1 within float error unless rollout and training disagree
            first_ratio = learned["ratio_mean"]
        bar.update(1)
    return learned, first_ratio


def reward_stats(trainer, rewards) -> dict[str, float]:
    """Mean and (population) std of the rewards of every process's completions."""
    n = trainer.global_sum(rewards.numel())
    mean = trainer.global_sum(float(rewards.sum())) / n
    var = trainer.global_sum(float((rewards.double() - mean).square().sum())) / n
    return {"reward": mean, "reward_std": var**0.5}


def write_samples(path: Path, step: int, prompts, texts, rewards, group_size: int, groups: int = 2) -> None:
    """A few prompts with all their answers and rewards, one JSON line per completion."""
    with open(path, "a") as f:
        for i in range(min(len(texts), groups * group_size)):
            rec = {"step": step, "prompt": prompts[i].text, "response": texts[i], "reward": rewards[i]}
            if prompts[i].answer is not None:
                rec["answer"] = prompts[i].answer
            f.write(json.dumps(rec) + "\n")
