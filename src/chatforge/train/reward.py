"""Stage 2, the reward model: `chatforge rm CONFIG.yaml [key=value ...]`.

A scalar score head on the causal LM backbone (`models.heads.ScalarHeadModel`, composition), read
at the last real token of prompt + response, trained on preference pairs with the pairwise loss
-log sigmoid(r_chosen - r_rejected - margin) (+ `rm.center_coef` (r_chosen + r_rejected)^2),
full fine-tuning or LoRA/QLoRA like SFT. Chosen and rejected rows share one forward pass.

Logged per step and per eval (eval/...): loss, rewards/accuracy (chosen scored higher),
rewards/margin, rewards/chosen, rewards/rejected.

Output, OUTPUT/final/ (see README "Reward model format"):
    the LM part as `adapters.save_final` writes it: a plain peft adapter dir (LoRA/QLoRA) or a
        full transformers causal-LM dir (peft.method=none), plus the tokenizer;
    score_head.safetensors   the head: weight (1, hidden) and bias (1,), fp32;
    score_head.json          {"name", "in_features", "reward_mean", "reward_std", "eval_accuracy",
                              "eval_margin", "stats_on", "pairs", "base_model", "peft_method"}:
                             mean/std of the scores of every chosen and rejected response of the
                             eval set (the train set, first 1000 pairs, when there is none); PPO
                             normalises rewards with them.
It loads back with `chatforge.reward.load_reward_model(dir)`. The layout is not
AutoModelForSequenceClassification's (that head has no bias and would clash with the causal-LM
config the PPO stage reads); `chatforge export-rm` (`reward.export_sequence_classifier`) writes that
layout for other tools.
"""

from __future__ import annotations

from functools import partial

from chatforge.config import Config
from chatforge.reward import load_reward_model, score_texts  # noqa: F401  (public re-export)

STATS_LIMIT = 1000  # pairs scored for reward_mean/std when there is no eval set


def pair_scores(model, batch: dict):
    """Scores (2B,) at each response's last token: chosen first, then rejected (rows or branched)."""
    import torch

    from chatforge.models.heads import last_token_index

    values = model(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
    if "last" in batch:  # branched: one row per pair
        scores = values.gather(1, batch["last"])
        return torch.cat([scores[:, 0], scores[:, 1]])
    return values.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)


def rm_loss(model, batch, normalizer, center_coef: float = 0.0):
    from chatforge.losses.preference import reward_loss

    scores = pair_scores(model, batch)
    b = scores.shape[0] // 2
    return reward_loss(scores[:b], scores[b:], batch.get("margin"), center_coef, normalizer)


def score_statistics(trainer, items: list[dict], collate, batch_size: int, center_coef: float = 0.0) -> dict:
    """Mean/std of all chosen and rejected scores, accuracy, mean margin and loss over `items`."""
    import torch

    from chatforge.losses.preference import reward_loss

    model = trainer.acc.unwrap_model(trainer.model)
    model.eval()
    chosen, rejected, loss = [], [], 0.0
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        batch = {k: v.to(trainer.acc.device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}
        with torch.no_grad(), trainer.acc.autocast():
            scores = pair_scores(model, batch).float().cpu()
        c, r = scores[: len(chunk)], scores[len(chunk) :]
        margin = batch.get("margin")
        loss += float(reward_loss(c, r, None if margin is None else margin.cpu(), center_coef)[0]) * len(
            chunk
        )
        chosen += c.tolist()
        rejected += r.tolist()
    every = torch.tensor(chosen + rejected, dtype=torch.float64)
    diff = torch.tensor(chosen, dtype=torch.float64) - torch.tensor(rejected, dtype=torch.float64)
    return {
        "reward_mean": float(every.mean()),
        "reward_std": float(every.std(correction=0)) if len(every) > 1 else 1.0,
        "eval_accuracy": float((diff > 0).double().mean()),
        "eval_margin": float(diff.mean()),
        "eval_loss": loss / max(len(chosen), 1),
        "chosen_mean": sum(chosen) / max(len(chosen), 1),
        "rejected_mean": sum(rejected) / max(len(rejected), 1),
        "pairs": len(chosen),
    }


def as_eval_metrics(stats: dict) -> dict:
    """The statistics pass as the final eval metrics (the names `Trainer.evaluate` logs)."""
    return {
        "eval/loss": stats["eval_loss"],
        "eval/rewards/chosen": stats["chosen_mean"],
        "eval/rewards/rejected": stats["rejected_mean"],
        "eval/rewards/accuracy": stats["eval_accuracy"],
        "eval/rewards/margin": stats["eval_margin"],
    }


def run(cfg: Config) -> str:
    import os

    from chatforge.errors import ConfigError
    from chatforge.models.adapters import save_final
    from chatforge.models.heads import ScalarHeadModel, disable_dropout
    from chatforge.models.load import load_tokenizer, resolve_model_path
    from chatforge.train.common import build_policy, log, start_run
    from chatforge.train.dpo import load_pairs, pair_collate, pair_units
    from chatforge.train.loop import Trainer
    from chatforge.train.schedule import steps_for

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one preference file")
    if cfg.rm.center_coef < 0:
        raise ConfigError(f"rm.center_coef must be 0 or more (got {cfg.rm.center_coef!r})")
    if cfg.peft.method in ("prefix", "prompt"):
        raise ConfigError(
            "peft.method must be lora, qlora or none for a reward model (the score head reads hidden states)"
        )
    start_run(cfg, "rm")
    # the data is checked before the model loads: a bad record fails in seconds
    items, eval_items = load_pairs(cfg, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code))
    policy, tok = build_policy(cfg)
    lm = policy.lm
    disable_dropout(lm)
    model = ScalarHeadModel(lm, name="score")
    collate = pair_collate(cfg, lm, tok.pad_token_id)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = Trainer(model, cfg.train, steps_for(len(items), cfg.train, world), dist=cfg.dist)
    stats_on = "eval" if eval_items else "train"
    stats_items = eval_items or items[:STATS_LIMIT]
    score = partial(
        score_statistics,
        items=stats_items,
        collate=collate,
        batch_size=cfg.train.batch_size,
        center_coef=cfg.rm.center_coef,
    )
    stats: dict = {}

    def last_step(tr, metrics: dict) -> None:
        # The held-out pairs are scored once at the end: the same pass gives the saved mean/std
        # and the final eval metrics (a second evaluation would double the stage's eval time).
        if tr.step == tr.total_steps:
            stats.update(score(tr))
            if eval_items:
                metrics.update(as_eval_metrics(stats))

    trainer.fit(
        items,
        collate,
        partial(rm_loss, center_coef=cfg.rm.center_coef),
        pair_units,
        eval_items=eval_items if cfg.train.eval_every else None,  # periodic evals only
        on_step=last_step,
    )
    if not stats:  # resumed after the last step: nothing ran
        stats = score(trainer)
    meta = {
        **stats,
        "stats_on": stats_on,
        "base_model": resolve_model_path(cfg.model.path),
        "peft_method": cfg.peft.method,
    }
    log(
        f"reward on {stats_on} set: accuracy {stats['eval_accuracy']:.3f}, "
        f"mean {stats['reward_mean']:.3f}, std {stats['reward_std']:.3f}"
    )
    head_model = trainer.acc.unwrap_model(trainer.model)

    def write(tmp) -> None:
        save_final(head_model.lm, tok, tmp)
        head_model.save_head(tmp, extra=meta)

    final = trainer.save_final(write)
    log(f"done: {final}")
    return str(final)
