"""RLHF with PPO: `chatforge ppo CONFIG.yaml [key=value ...]`.

Each PPO step takes `ppo.rollout_batch_size` prompts; the actor samples `ppo.samples_per_prompt`
answers to each, the reward scores them, and `rl.experience` turns them into per-token rewards
(score at the last token minus kl_coef x KL to the reference) and advantages by `ppo.advantage`
(`rl.advantages`): GAE with a critic (default), or a critic-free estimator that compares the answers
to one prompt (rloo, group_norm, reinforce_pp_baseline) or whitens returns (reinforce_pp). Then `ppo.ppo_epochs` passes over the
rollout in shuffled minibatches of `ppo.mini_batch_size`, one optimizer step each (micro-batches of
`train.batch_size`), on the clipped policy loss + vf_coef x the clipped value loss (+ ptx_coef x
an SFT loss on `ppo.ptx_data`). Without a critic of its own (a critic-free estimator, or
`ppo.critic=head`) the answers to one prompt in a micro-batch are one branched row, the prompt
once (`data.share_prompt`), in experience and learning; minibatches are drawn as with plain rows. In one
process a critic of its own (adapter or model) learns in
a second backward pass after the actor's, so only one role's activations are held at a time. The
KL coefficient is fixed or adaptive (`ppo.kl_target`).

    step:  prompts -> generate -> score -> experience -> [minibatch updates] x ppo_epochs

The outer loop (prompts per process, logging, samples, checkpoints, resume) is the one GRPO shares,
`chatforge.train.rl_loop`; this file holds PPO's step. Where the roles live is `chatforge.rl.roles`
(loaded by `chatforge.rl.build`, printed at start-up): with LoRA one frozen base and
actor/critic/reference/reward adapters. The shared `Trainer` does the optimizer (the critic may
have its own `ppo.critic_lr`), accumulation, logging and checkpoints; `train.max_steps` counts PPO
steps; a run stopped between steps (Ctrl-C, a reward function that raises) also checkpoints its
finished steps. Under DDP (torchrun / accelerate launch) every process samples its own
`ppo.rollout_batch_size` prompts of the step and gradients are averaged; advantages are whitened per
process, and the logged rollout statistics and the adaptive KL use the mean over processes.
Output: OUTPUT/final (the actor: an adapter dir, the critic adapter + value head in
final/critic/), metrics.jsonl, samples.jsonl every `ppo.samples_every` steps.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

from chatforge.config import Config


def ppo_loss(
    model, batch, normalizer, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, reduction="token", split=False
):
    """Clipped policy loss + vf_coef * clipped value loss on one micro-batch (an `Experience.batch`).

    A batch with `ptx` set is an SFT micro-batch instead: ptx_coef * its token-mean NLL.
    split=True (a critic with its own adapter or model) yields the policy part and then the value part, each backwarded
    before the next runs (`loop.loss_parts`): the same gradients with one role's activations alive
    at a time instead of both.
    """
    from chatforge.losses.reduce import masked_mean

    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    if "ptx" in batch:
        target = batch["labels"] != -100
        logps, _, _ = model(ids, mask, pos, target, values=False)
        nll = masked_mean(-logps, target[:, 1:])
        return batch["ptx"] * nll, {}
    policy = partial(_policy_part, batch=batch, clip_eps=clip_eps, reduction=reduction, normalizer=normalizer)
    value = partial(
        _value_part, batch=batch, clip_eps=value_clip_eps, reduction=reduction, normalizer=normalizer
    )
    args = (ids, mask, pos, batch["target_mask"])
    if split:
        return _ppo_parts(model, args, policy, value, vf_coef)
    logps, entropy, values = model(*args, **({"prev": batch["prev"]} if "prev" in batch else {}))
    pg, metrics = policy(logps, entropy)
    if not vf_coef:  # a critic-free estimator: no value function to learn
        return pg, metrics
    vl, vmetrics = value(values)
    return pg + vf_coef * vl, {**metrics, **vmetrics}


def _ppo_parts(model, args, policy, value, vf_coef):
    # each part's backward runs while its role is still active, so checkpointed layers are
    # recomputed without switching adapters back and forth
    roles = model.roles
    with roles.use("actor"):
        logps, entropy, _ = model(*args, part="actor")
        yield policy(logps, entropy)
    with roles.use("critic"):
        _, _, values = model(*args, part="critic")
        vl, metrics = value(values)
        yield vf_coef * vl, metrics


def _policy_part(logps, entropy, batch, clip_eps, reduction, normalizer):
    from chatforge.losses.policy import ppo_policy_loss
    from chatforge.losses.reduce import masked_mean
    from chatforge.rl.experience import response_view

    rmask = batch["response_mask"]
    logp = response_view(logps, batch)
    pg, metrics = ppo_policy_loss(
        logp, batch["old_logp"], batch["advantages"], rmask, clip_eps, reduction, normalizer
    )
    metrics["policy_loss"] = ppo_policy_loss(
        logp.detach(), batch["old_logp"], batch["advantages"], rmask, clip_eps
    )[0]
    metrics["entropy"] = masked_mean(response_view(entropy, batch), rmask)
    return pg, metrics


def _value_part(values, batch, clip_eps, reduction, normalizer):
    from chatforge.losses.policy import value_loss
    from chatforge.rl.experience import response_view

    rmask = batch["response_mask"]
    values = response_view(values, batch)
    vl, metrics = value_loss(
        values, batch["old_values"], batch["returns"], rmask, clip_eps, reduction, normalizer
    )
    metrics["value_loss"] = value_loss(
        values.detach(), batch["old_values"], batch["returns"], rmask, clip_eps
    )[0]
    return vl, metrics


def ppo_units(batch, reduction: str = "token") -> int:
    from chatforge.losses.reduce import count_units

    if "ptx" in batch:
        return 0  # the SFT term is its own mean; it does not share the PPO normalizer
    return count_units(batch["response_mask"], reduction)


def minibatch_order(n: int, seed: int, step: int, epoch: int) -> list[int]:
    """Row order of a rollout in one PPO epoch: deterministic in (seed, step, epoch) for exact resume."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000003 + step * 101 + epoch)
    return torch.randperm(n, generator=g).tolist()


def minibatches(order: list[int], size: int) -> list[list[int]]:
    """`order` cut into minibatches of `size` rows, each minibatch's rows in rollout order: a prompt's
    answers are adjacent rows of the rollout, so those that share a minibatch sit together there (one
    branched row) while which rows share it stays random.

    >>> minibatches([5, 0, 3, 1, 4, 2], 3)
    [[0, 3, 5], [1, 2, 4]]
    """
    return [sorted(order[lo : lo + size]) for lo in range(0, len(order), size)]


def check(cfg: Config) -> None:
    from chatforge.errors import ConfigError
    from chatforge.rl.build import check_estimator

    p = cfg.ppo
    check_estimator(p)
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one prompt file")
    if not p.reward_functions and not p.reward_model:
        raise ConfigError("ppo needs a reward: set ppo.reward_model and/or ppo.reward_functions")
    if min(p.rollout_batch_size, p.ppo_epochs, p.mini_batch_size, p.forward_batch_size) < 1:
        raise ConfigError(
            "ppo.rollout_batch_size, ppo.ppo_epochs, ppo.mini_batch_size and ppo.forward_batch_size "
            "must be at least 1"
        )
    if p.ptx_coef > 0 and not p.ptx_data:
        raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_data (SFT files for the pretraining-loss mix)")
    if cfg.dist.strategy == "fsdp2" and p.layout == "separate":
        raise ConfigError("dist.strategy=fsdp2 runs PPO's lean layout only: drop ppo.layout=separate")


def param_groups(model, critic_lr: float) -> list[dict] | None:
    """Actor and critic parameters in separate groups when the critic has its own learning rate."""
    if not critic_lr:
        return None
    critic = {id(p) for n, p in model.named_parameters() if ".critic." in n or n.startswith("critic.")}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for _, p in params if id(p) not in critic]},
        {"params": [p for _, p in params if id(p) in critic], "lr": critic_lr},
    ]


def run(cfg: Config) -> str:
    from chatforge.data.prompts import require_answers
    from chatforge.errors import ConfigError
    from chatforge.losses.policy import explained_variance
    from chatforge.models.load import pick_device
    from chatforge.rl import experience as xp
    from chatforge.rl.advantages import ESTIMATORS
    from chatforge.rl.build import build_roles
    from chatforge.rl.kl_control import kl_controller
    from chatforge.rl.rewards import RuleRewards, Scorer
    from chatforge.train.common import log, share_prompt
    from chatforge.train.dist import unsharded
    from chatforge.train.loop import Trainer
    from chatforge.train.rl_loop import RLStage, load_prompts, run_loop, total_steps, world_size

    check(cfg)
    p, gen_cfg = cfg.ppo, cfg.generate
    items = load_prompts(cfg, "ppo")
    world = world_size()  # under DDP each process samples its own rollout
    if p.rollout_batch_size * world > len(items):
        raise ConfigError(
            f"ppo.rollout_batch_size ({p.rollout_batch_size}) x {world} processes exceeds the {len(items)} "
            "prompts: add prompts or lower it"
        )
    device = pick_device(cfg.train.device)
    rules = None
    if p.reward_functions:
        rules = RuleRewards(p.reward_functions, p.reward_weights)
        if rules.needs_answers:
            require_answers(items, ", ".join(rules.needs_answers))
    roles = build_roles(cfg, device)
    has_critic = ESTIMATORS[p.advantage].critic
    if not has_critic:  # nothing trains the (unused) value head; DDP wants no unused trainables
        roles.critic.head.requires_grad_(False)
        roles.notes["critic"] = f"none (ppo.advantage={p.advantage} learns no value function)"
    # log-probs of the tempered distribution the rollouts are sampled from (actor and reference)
    for m in {id(x): x for x in (roles.policy, roles.ref_policy) if x is not None}.values():
        m.temperature = gen_cfg.temperature
    scorer = Scorer(rules, roles.reward)
    if cfg.dist.strategy == "fsdp2" and world > 1:  # where the base's bytes live
        roles.notes["base"] += f"; 1/{world} per process (fsdp2), whole during each rollout"
    log(roles.describe())
    ptx = _ptx_items(cfg, roles.tokenizer) if p.ptx_coef > 0 else []
    steps = total_steps(cfg.train, len(items), p.rollout_batch_size, world)
    per_rollout = p.ppo_epochs * (p.rollout_batch_size * p.samples_per_prompt // p.mini_batch_size)
    model = roles.model()
    groups = partial(param_groups, critic_lr=p.critic_lr)  # of the model as the Trainer shards it
    trainer = Trainer(model, cfg.train, steps * per_rollout, groups, device, dist=cfg.dist)
    kl_ctl = kl_controller(p.kl_coef, p.kl_target, p.kl_horizon)
    reduction = cfg.train.loss_reduction
    # a critic of its own (adapter or model) learns in a backward pass after the actor's; DDP
    # wants one backward per forward, so several processes keep the joint loss
    split = roles.critic_mode == "adapter" and world == 1
    loss_fn = partial(
        ppo_loss,
        clip_eps=p.clip_eps,
        value_clip_eps=p.value_clip_eps,
        vf_coef=p.vf_coef if has_critic else 0.0,
        reduction=reduction,
        split=split,
    )
    units_fn = partial(ppo_units, reduction=reduction)
    # the answers to one prompt in one row, the prompt once, where no critic of its own reads rows
    branched = roles.critic_mode == "head" and share_prompt(cfg, roles.policy.lm, "learning batches")
    multiple = cfg.data.pad_to_multiple_of

    def all_sum(t):  # sums over processes: the global whitening of the advantages
        if trainer.world == 1:
            return t
        return trainer.acc.reduce(t.to(trainer.acc.device), "sum").to(t.device)

    def learn(step, exp, bar) -> dict:
        """ppo.ppo_epochs passes over the rollout in shuffled minibatches; the mean of their metrics."""
        bs, rank, sums, n_updates = cfg.train.batch_size, trainer.acc.process_index, {}, 0
        for epoch in range(p.ppo_epochs):
            order = minibatch_order(len(exp), cfg.train.seed, step, epoch)
            for rows in minibatches(order, p.mini_batch_size):
                micro = [
                    xp.experience_batch(exp, rows[i : i + bs], trainer.acc.device, multiple, branched)
                    for i in range(0, len(rows), bs)
                ]
                if ptx:  # first: DDP syncs on the last micro-batch, which must run the critic too
                    sft = _ptx_batch(ptx, trainer.step, bs, p.ptx_coef, roles.tokenizer, cfg, rank, world)
                    micro.insert(0, trainer._to_device(sft))
                for k, v in trainer.train_step(micro, loss_fn, units_fn).items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
                bar.update(1)
        return {k: v / n_updates for k, v in sums.items()}

    def step(rl_step, prompts, seeds, bar):  # rollout -> score -> experience -> learn
        with unsharded(trainer.model, cfg.dist.reshard_after_forward):  # fsdp2: whole weights, once
            t0 = time.perf_counter()
            gen = xp.sample(roles, prompts, gen_cfg, p.generation_batch_size, seeds)
            t1 = time.perf_counter()
            rollout, parts = xp.score(roles, scorer, prompts, gen, p.score_clip, p.missing_eos_penalty)
            t2 = time.perf_counter()
            exp, stats = xp.make_experience(
                roles, rollout, kl_ctl.value, p.kl_estimator, p.gamma, p.lam, p.whiten_advantages,
                p.forward_batch_size, trainer.acc.device, trainer.acc.autocast,
                multiple, p.advantage, p.samples_per_prompt, all_sum, branched,
            )  # fmt: skip
            t3 = time.perf_counter()
        metrics = learn(rl_step, exp, bar)
        t4 = time.perf_counter()
        # rollout statistics are means over equal-sized rollouts: average them over processes
        metrics.update({k: trainer.global_sum(v) / world for k, v in {**stats, **parts}.items()})
        if has_critic:
            ev = explained_variance(exp.old_values, exp.returns, exp.response_mask)
            metrics["explained_variance"] = trainer.global_sum(ev) / world
        metrics.update(
            {
                "ppo_step": rl_step + 1,
                "kl_coef": kl_ctl.value,
                "gen_tokens_per_s": round(rollout.tokens_per_s, 1),
                "time/generate": round(t1 - t0, 3),
                "time/score": round(t2 - t1, 3),
                "time/experience": round(t3 - t2, 3),
                "time/learn": round(t4 - t3, 3),
            }
        )
        kl_ctl.update(metrics["kl"], len(exp) * world)  # the same on every process
        return metrics, partial(write_samples, prompts=prompts, rollout=rollout)

    stage = RLStage(
        "ppo",
        p.rollout_batch_size,
        p.samples_per_prompt,
        per_rollout,
        p.samples_every,
        step,
        state=lambda: {"kl_ctl": kl_ctl.state_dict()},
        load_state=lambda state: kl_ctl.load_state_dict(state["kl_ctl"]),
    )
    run_loop(trainer, stage, items, steps, cfg.train, gen_cfg.seed_per_row)
    final = trainer.save_final(partial(save_actor, roles, critic=has_critic))
    log(f"done: {final}")
    return str(final)


def _ptx_items(cfg: Config, tokenizer) -> list:
    from chatforge.data.dataset import build_sft_examples
    from chatforge.train.common import log

    examples, report = build_sft_examples(
        cfg.ppo.ptx_data, tokenizer=tokenizer, max_length=cfg.data.max_length
    )
    log(f"ptx data: {report.summary()}")
    return examples


def _ptx_batch(items, opt_step: int, size: int, coef: float, tokenizer, cfg, rank: int = 0, world: int = 1):
    """This process's SFT micro-batch of optimizer step `opt_step`: its slice of a global batch of
    size x world (deterministic, so resume replays it)."""
    from chatforge.data.collate import pad_batch
    from chatforge.train.schedule import epoch_order

    per_pass = max(1, len(items) // (size * world))
    epoch, pos = divmod(opt_step, per_pass)
    order = epoch_order(len(items), cfg.train.seed + 7, epoch)
    start = (pos * world + rank) * size
    chosen = [items[i] for i in order[start : start + size]] or items[:size]
    batch = pad_batch(chosen, pad_id=tokenizer.pad_token_id)
    batch["ptx"] = coef
    return batch


def save_actor(roles, tmp: Path, critic: bool = True) -> None:
    """final/: the actor (a peft adapter dir, or a full model dir), the critic (when there is one)
    in final/critic/."""
    import shutil

    from chatforge.models.adapters import save_final

    tok = roles.tokenizer
    if roles.layout != "lean":
        save_final(roles.policy.lm, tok, tmp)
        return
    peft = roles.policy.lm
    adapters = ["actor"] if roles.critic_mode == "head" else ["actor", "critic"]
    peft.save_pretrained(tmp, selected_adapters=adapters)
    for f in (tmp / "actor").iterdir():  # peft writes named adapters to subdirs: lift the actor up
        shutil.move(str(f), tmp / f.name)
    (tmp / "actor").rmdir()
    tok.save_pretrained(tmp)
    if critic:
        roles.critic.save_head(tmp / "critic")


def write_samples(path: Path, step: int, prompts, rollout, n: int = 4) -> None:
    """A few prompts with their responses and scores, one JSON line each."""
    with open(path, "a") as f:
        for i in range(min(n, len(rollout.texts))):
            rec = {
                "step": step,
                "prompt": prompts[i].text,
                "response": rollout.texts[i],
                "score": float(rollout.scores[i]),
                "raw_score": float(rollout.raw_scores[i]),
                "stopped": bool(rollout.stopped[i]),
            }
            if prompts[i].answer is not None:
                rec["answer"] = prompts[i].answer
            f.write(json.dumps(rec) + "\n")
