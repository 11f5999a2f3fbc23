"""Set-up shared by the training stages: output dir, effective config, model + adapter, data split.

Each stage file (sft, pretrain, rm, dpo, ppo, grpo) builds its objects with these helpers and hands
a loss function to the shared `Trainer`; none of them copies the loop.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from chatforge.config import Config, save_config


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so adapter initialisation and dropout repeat run to run."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(cfg: Config, stage: str) -> Path:
    """Create the output dir, write the effective config and seed every RNG (before models exist)."""
    from chatforge import allocator

    seed_everything(cfg.train.seed)
    log(allocator.describe())
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    (out / "stage").write_text(stage + "\n")
    return out


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"chatforge: {msg}", flush=True)


def build_policy(cfg: Config, dropout: float | None = None):
    """(LogprobModel around the causal LM with its adapter applied, tokenizer)."""
    from chatforge.models.adapters import apply_peft, trainable_summary
    from chatforge.models.load import load_for_training
    from chatforge.models.logprobs import LogprobModel

    lm, tok = load_for_training(cfg.model, cfg.peft.method)
    lm = apply_peft(lm, cfg.peft, cfg.model.gradient_checkpointing, dropout=dropout)
    log(f"model {cfg.model.path} ({lm.dtype}, peft={cfg.peft.method}); {trainable_summary(lm)}")
    return LogprobModel(lm), tok


def share_prompt(cfg: Config, lm, what: str) -> bool:
    """Whether rows that share a prompt go into one branched row (`data.share_prompt`), logged."""
    from chatforge.errors import ConfigError
    from chatforge.models.logprobs import branches_supported

    mode = cfg.data.share_prompt
    branched = mode != "off" and branches_supported(lm)
    if mode == "on" and not branched:
        raise ConfigError(
            "data.share_prompt=on, but this model does not compute a shared-prompt row exactly like "
            "separate rows (no 4D attention mask support, position biases of its own, or virtual "
            "tokens); use data.share_prompt=auto or off"
        )
    log(
        f"{what}: {'prompt shared, one row per prompt' if branched else 'one row each'} (data.share_prompt={mode})"
    )
    return branched


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a deterministic `fraction` of items for evaluation."""
    if not fraction:
        return items, []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(len(items) * fraction))
    held = set(idx[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def save_lm(trainer, model, tokenizer, extra_files: dict[str, str] | None = None) -> Path:
    """Save the trained causal LM (adapter dir or full model dir) to OUTPUT/final atomically."""
    from chatforge.models.adapters import save_final

    lm = trainer.acc.unwrap_model(model).lm

    def write(tmp: Path) -> None:
        save_final(lm, tokenizer, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return trainer.save_final(write)
