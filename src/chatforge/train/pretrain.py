"""Pretraining from scratch: `chatforge pretrain CONFIG.yaml [key=value ...]`.

Builds a LLaMA-style model from a size preset (`pretrain.preset`, see chatforge.plan.scaling),
borrows a tokenizer from an existing model, and trains on raw text cut into `data.max_length`
blocks. With `train.max_steps=0` the token budget is the compute-optimal 20 tokens per parameter
(Hoffmann et al., 2022, "Chinchilla"); the run prints the budget it picked. `data.eval` files or a
`data.eval_fraction` of the blocks give a held-out loss (`eval/loss` in metrics.jsonl) at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import partial

from chatforge.config import Config


def build_model(preset: str, tokenizer, max_length: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chatforge.errors import ConfigError
    from chatforge.plan.scaling import PRESETS, model_shape

    try:
        shape = model_shape(preset)
    except ValueError as e:
        raise ConfigError(
            f"pretrain.preset must be one of {', '.join(PRESETS)} or WIDTHxDEPTH like 96x3 (got {preset!r}): {e}"
        ) from None
    config = LlamaConfig(
        **shape,
        vocab_size=len(tokenizer),
        max_position_embeddings=max(max_length, 128),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def chinchilla_steps(n_params: int, tokens_per_param: float, tokens_per_step: int) -> int:
    """Optimizer steps that spend `tokens_per_param` tokens on every parameter.

    >>> chinchilla_steps(1_000_000, 20, 8192)
    2442
    """
    return max(1, math.ceil(n_params * tokens_per_param / tokens_per_step))


def run(cfg: Config) -> str:
    from chatforge.data.dataset import build_text_examples
    from chatforge.errors import ConfigError
    from chatforge.models.load import load_tokenizer
    from chatforge.train.common import log, split_eval, start_run

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one text file")
    if not cfg.pretrain.preset:
        raise ConfigError("pretrain.preset is empty: name a size preset (see chatforge plan --presets)")
    start_run(cfg, "pretrain")
    tok = load_tokenizer(cfg.pretrain.tokenizer)
    blocks, report = build_text_examples(cfg.data.train, tok, cfg.data.max_length)
    log(f"data: {report.summary()}")
    if cfg.data.eval:
        held, _ = build_text_examples(cfg.data.eval, tok, cfg.data.max_length)
    else:
        blocks, held = split_eval(blocks, cfg.data.eval_fraction, cfg.train.seed)
    final, _ = train_on_blocks(cfg, tok, blocks, held)
    return final


def train_on_blocks(cfg: Config, tok, blocks: list[dict], eval_blocks: list[dict]) -> tuple[str, dict]:
    """Build `pretrain.preset` and train it on tokenised `blocks`; returns (final dir, last metrics).

    The held-out loss on `eval_blocks` (if any) is logged as `eval/loss` at the last step. Callers
    that train many models on one corpus (the scaling study) tokenise once and call this per model.
    """
    import torch

    from chatforge.data.collate import pad_batch
    from chatforge.models.adapters import save_final
    from chatforge.models.load import pick_device
    from chatforge.models.logprobs import LogprobModel
    from chatforge.train.common import log
    from chatforge.train.loop import Trainer
    from chatforge.train.schedule import steps_for
    from chatforge.train.sft import sft_loss, sft_units

    torch.manual_seed(cfg.train.seed)
    lm = build_model(cfg.pretrain.preset, tok, cfg.data.max_length).to(pick_device(cfg.train.device))
    n_params = sum(p.numel() for p in lm.parameters())
    tokens = sum(len(b["input_ids"]) for b in blocks)
    log(f"model preset {cfg.pretrain.preset}: {n_params:,} parameters; {len(blocks)} training blocks")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tcfg = cfg.train
    if not tcfg.max_steps:
        per_step = tcfg.batch_size * tcfg.grad_accum * world * cfg.data.max_length
        steps = chinchilla_steps(n_params, cfg.pretrain.tokens_per_param, per_step)
        log(
            f"train.max_steps=0: compute-optimal budget of {cfg.pretrain.tokens_per_param:g} tokens/parameter "
            f"= {n_params * cfg.pretrain.tokens_per_param:,.0f} tokens = {steps} steps "
            f"({steps * per_step / max(tokens, 1):.1f} passes over the data)"
        )
        tcfg = dataclasses.replace(tcfg, max_steps=steps)
    trainer = Trainer(LogprobModel(lm), tcfg, steps_for(len(blocks), tcfg, world), dist=cfg.dist)
    collate = partial(pad_batch, pad_id=tok.pad_token_id)
    last = trainer.fit(blocks, collate, sft_loss, sft_units, eval_items=eval_blocks or None)
    final = trainer.save_final(lambda tmp: save_final(trainer.acc.unwrap_model(trainer.model).lm, tok, tmp))
    log(f"done: {final}")
    return str(final), last
