"""Stage 2 without a reward model, the DPO family: `chatforge dpo CONFIG.yaml [key=value ...]`.

Trains the policy directly on preference pairs with `dpo.loss_type` (sigmoid = DPO, with
`dpo.label_smoothing` = cDPO; ipo; hinge; simpo) from `chatforge.losses.preference`, plus an
optional NLL term on the chosen response (`dpo.sft_weight`). Each step runs ONE forward over the
chosen and rejected responses together (`data.preference.collate_pairs`): by default each pair is
one row with the prompt once (`data.share_prompt`), else a chosen row and a rejected row.

The reference model costs no second copy with adapters: it is the same weights with the adapter
switched off (`disable_adapter()`, under no_grad). With full fine-tuning it is a frozen copy, or,
with `dpo.precompute_ref=true`, its log-probs are computed once over the data before the first step
so training holds one model (also a saving with adapters: no reference forward per step). SimPO
needs no reference. Dropout is off so the policy equals the reference at step 0 (loss ln 2 for
sigmoid, (1/(2 beta))^2 for IPO).

Logged per step: loss, rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin,
logps/chosen, logps/rejected (and nll with dpo.sft_weight). The output is OUTPUT/final/ as SFT
writes it (an adapter dir or a full model dir).
"""

from __future__ import annotations

from functools import partial

from chatforge.config import Config


def sequence_logps(model, batch: dict):
    """(summed response log-prob (2B,), response token count (2B,)) from one forward of a pair batch.

    `model` is a `LogprobModel` (or a data-parallel wrapper of one).
    """
    import torch

    ids, attention, positions = batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
    if "branch" in batch:  # branched: one row per pair, chosen = branch 1, rejected = branch 2
        logps, _ = model(ids, attention, positions, batch["branch"] > 0, prev=batch["prev"])
        sides = [batch["branch"][:, 1:] == k for k in (1, 2)]
        return torch.cat([(logps * m).sum(-1) for m in sides]), torch.cat([m.sum(-1) for m in sides])
    target = batch["labels"] != -100
    logps, _ = model(ids, attention, positions, target)
    mask = target[:, 1:]
    return (logps * mask).sum(-1), mask.sum(-1)


def _unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the model in .module


class AdapterOffReference:
    """The reference is the policy with its adapter disabled: no second copy of the weights."""

    name = "adapter disabled"

    def __call__(self, model, batch):
        import torch

        from chatforge.rl.reference import reference_context

        ctx, ref = reference_context(_unwrap(model))
        with torch.no_grad(), ctx:
            return sequence_logps(ref, batch)[0]


class FrozenReference:
    """A frozen copy of the starting model (full fine-tuning without dpo.precompute_ref)."""

    name = "frozen copy"

    def __init__(self, model):
        from chatforge.rl.reference import copy_frozen

        self.model = copy_frozen(_unwrap(model))

    def __call__(self, model, batch):
        import torch

        from chatforge.rl.reference import reference_context

        ctx, ref = reference_context(_unwrap(model), self.model)
        with torch.no_grad(), ctx:
            return sequence_logps(ref, batch)[0]


class SelfReference:
    """The model as it is now (for precomputing before the first step)."""

    name = "initial weights"

    def __call__(self, model, batch):
        import torch

        with torch.no_grad():
            return sequence_logps(_unwrap(model), batch)[0]


def dpo_loss(model, batch, normalizer, *, dcfg, reference=None):
    """Loss and metrics of a pair batch: policy forward, reference (given, precomputed or none)."""
    from chatforge.losses.preference import REFERENCE_FREE, preference_loss

    sums, counts = sequence_logps(model, batch)
    b = sums.shape[0] // 2
    means = sums / counts.clamp(min=1)
    ref_c = ref_r = None
    if dcfg.loss_type in REFERENCE_FREE:
        pc, pr = means[:b], means[b:]
    else:
        pc, pr = sums[:b], sums[b:]
        if "ref_chosen" in batch:
            ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        else:
            ref = reference(model, batch)
            ref_c, ref_r = ref[:b], ref[b:]
    return preference_loss(
        dcfg.loss_type,
        pc,
        pr,
        ref_c,
        ref_r,
        beta=dcfg.beta,
        label_smoothing=dcfg.label_smoothing,
        gamma=dcfg.simpo_gamma,
        sft_nll=-means[:b] if dcfg.sft_weight else None,
        sft_weight=dcfg.sft_weight,
        normalizer=normalizer,
    )


def pair_units(batch: dict) -> int:
    """Pairs in a batch: the loss is a mean over pairs."""
    return len(batch["margin"])


def precompute_reference(trainer, reference, groups: list[list[dict]], collate, batch_size: int) -> None:
    """Store `ref_chosen` / `ref_rejected` on every example, computed once before training."""
    import torch

    model = trainer.acc.unwrap_model(trainer.model)
    model.eval()
    device = trainer.acc.device
    for items in groups:
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}
            with torch.no_grad(), trainer.acc.autocast():
                ref = reference(model, batch).float().cpu()
            for i, ex in enumerate(chunk):
                ex["ref_chosen"], ex["ref_rejected"] = float(ref[i]), float(ref[len(chunk) + i])


def check_dpo_config(dcfg) -> None:
    from chatforge.errors import ConfigError

    if dcfg.beta <= 0:
        raise ConfigError(f"dpo.beta must be a positive number (got {dcfg.beta!r})")
    if not 0 <= dcfg.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5) (got {dcfg.label_smoothing!r})")
    if dcfg.label_smoothing and dcfg.loss_type not in ("sigmoid", "simpo"):
        raise ConfigError(
            f"dpo.label_smoothing applies to the sigmoid and simpo losses, not {dcfg.loss_type}"
        )
    if dcfg.sft_weight < 0:
        raise ConfigError(f"dpo.sft_weight must be 0 or more (got {dcfg.sft_weight!r})")


def pair_collate(cfg: Config, lm, pad_id: int):
    """`collate_pairs` in the layout `data.share_prompt` asks for, with the choice logged."""
    from chatforge.data.preference import collate_pairs
    from chatforge.train.common import share_prompt

    return partial(
        collate_pairs,
        pad_id=pad_id,
        branched=share_prompt(cfg, lm, "pair batches"),
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
    )


def load_pairs(cfg: Config, tokenizer):
    """(train pairs, eval pairs) per data.train / data.eval / data.eval_fraction, with logged reports."""
    from chatforge.data.preference import build_preference_examples
    from chatforge.train.common import log, split_eval

    build = partial(build_preference_examples, tokenizer=tokenizer, max_length=cfg.data.max_length, warn=log)
    examples, report = build(cfg.data.train)
    log(f"train data: {report.summary()}")
    if cfg.data.eval:
        eval_examples, eval_report = build(cfg.data.eval)
        log(f"eval data: {eval_report.summary()}")
        return examples, eval_examples
    return split_eval(examples, cfg.data.eval_fraction, cfg.train.seed)


def run(cfg: Config) -> str:
    import os

    from chatforge.errors import ConfigError
    from chatforge.losses.preference import REFERENCE_FREE
    from chatforge.models.heads import disable_dropout
    from chatforge.models.load import load_tokenizer
    from chatforge.train.common import build_policy, log, save_lm, start_run
    from chatforge.train.loop import Trainer
    from chatforge.train.schedule import steps_for

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one preference file")
    check_dpo_config(cfg.dpo)
    start_run(cfg, "dpo")
    # the data is checked before the model loads: a bad record fails in seconds
    items, eval_items = load_pairs(cfg, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code))
    model, tok = build_policy(cfg, dropout=0.0)
    disable_dropout(model.lm)
    collate = pair_collate(cfg, model.lm, tok.pad_token_id)
    adapters = cfg.peft.method != "none"
    reference = None
    if cfg.dpo.loss_type in REFERENCE_FREE:
        log(f"reference: none ({cfg.dpo.loss_type} is reference-free)")
    elif not cfg.dpo.precompute_ref:
        reference = AdapterOffReference() if adapters else FrozenReference(model)
        log(f"reference: {reference.name}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = Trainer(model, cfg.train, steps_for(len(items), cfg.train, world), dist=cfg.dist)
    if cfg.dpo.precompute_ref and cfg.dpo.loss_type not in REFERENCE_FREE:
        pre = AdapterOffReference() if adapters else SelfReference()
        log(f"reference: log-probs precomputed once ({pre.name}) over {len(items) + len(eval_items)} pairs")
        precompute_reference(trainer, pre, [items, eval_items], collate, cfg.train.batch_size)
    trainer.fit(
        items,
        collate,
        partial(dpo_loss, dcfg=cfg.dpo, reference=reference),
        pair_units,
        eval_items=eval_items,
    )
    final = save_lm(trainer, trainer.model, tok)
    log(f"done: {final}")
    return str(final)
