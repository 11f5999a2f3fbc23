"""Stage 1, supervised fine-tuning: `chatforge sft CONFIG.yaml [key=value ...]`.

Trains a causal LM on chat records (`messages`) or prompt/completion pairs, with the loss on
assistant tokens only by default. Packing (`data.packing=true`) puts several examples per row with
position ids restarting per example, so no attention or position leaks across examples.
"""

from __future__ import annotations

from functools import partial

from chatforge.config import Config


def sft_loss(model, batch, normalizer, reduction: str = "token"):
    """Masked next-token NLL; `normalizer` is the global unit count the trainer computed."""
    from chatforge.losses.sft import nll_loss

    target = batch["labels"] != -100
    logps, _ = model(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), target)
    return nll_loss(logps, target[:, 1:], reduction, normalizer)


def sft_units(batch, reduction: str = "token") -> int:
    from chatforge.losses.reduce import count_units

    return count_units(batch["labels"][:, 1:] != -100, reduction)


def make_collate(tokenizer, packing: bool, pad_to_multiple_of: int | None = None):
    from chatforge.data.collate import collate_packed, pad_batch

    collate = collate_packed if packing else pad_batch
    return partial(collate, pad_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def check_packing(lm) -> None:
    """Packing needs position ids that restart per example; ALiBi models (BLOOM) take none."""
    import inspect

    from chatforge.errors import ConfigError
    from chatforge.models import base_model

    base = base_model(lm)
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise ConfigError(
            f"data.packing=true is not supported for {base.config.model_type} (no position ids)"
        )


def prepare_items(examples: list, max_length: int, packing: bool) -> list:
    from chatforge.data.collate import pack

    return pack(examples, max_length) if packing else examples


def run(cfg: Config) -> str:
    from chatforge.data.dataset import build_sft_examples
    from chatforge.errors import ConfigError
    from chatforge.models.load import load_tokenizer
    from chatforge.train.common import build_policy, log, save_lm, split_eval, start_run
    from chatforge.train.loop import Trainer
    from chatforge.train.schedule import steps_for

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one training file")
    start_run(cfg, "sft")
    # the data is checked before the model loads: a bad record fails in seconds
    build = partial(
        build_sft_examples,
        tokenizer=load_tokenizer(cfg.model.path, cfg.model.trust_remote_code),
        max_length=cfg.data.max_length,
        assistant_only=cfg.data.assistant_only_loss,
    )
    examples, report = build(cfg.data.train)
    log(f"train data: {report.summary()}")
    eval_examples = []
    if cfg.data.eval:
        eval_examples, eval_report = build(cfg.data.eval)
        log(f"eval data: {eval_report.summary()}")
    else:
        examples, eval_examples = split_eval(examples, cfg.data.eval_fraction, cfg.train.seed)
    model, tok = build_policy(cfg)
    if cfg.data.packing:
        check_packing(model.lm)
    items = prepare_items(examples, cfg.data.max_length, cfg.data.packing)
    eval_items = prepare_items(eval_examples, cfg.data.max_length, cfg.data.packing)
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = Trainer(model, cfg.train, steps_for(len(items), cfg.train, world), dist=cfg.dist)
    reduction = cfg.train.loss_reduction
    trainer.fit(
        items,
        make_collate(tok, cfg.data.packing, cfg.data.pad_to_multiple_of),
        partial(sft_loss, reduction=reduction),
        partial(sft_units, reduction=reduction),
        eval_items=eval_items,
        on_step=_add_perplexity,
    )
    final = save_lm(trainer, trainer.model, tok)
    log(f"done: {final}")
    return str(final)


def _add_perplexity(trainer, metrics: dict) -> None:
    import math

    if "eval/loss" in metrics:
        metrics["eval/ppl"] = math.exp(min(metrics["eval/loss"], 50.0))
