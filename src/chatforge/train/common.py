"""Set-up shared by the training stages: output dir, effective config, model + adapter, data split.

Each stage file (sft, pretrain, rm, dpo, ppo, grpo) builds its objects with these helpers and hands
a loss function to the shared `Trainer`; none of them copies the loop.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import Config, save_config


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so adapter initialisation and dropout repeat run to run."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class PendingRun:
    """What a stage writes into its output dir once its Trainer exists (the run is then known to
    start): the effective config, the stage name, and the run's identity for its checkpoints."""

    cfg: Config
    stage: str

    @property
    def identity(self) -> dict:
        from chatforge.config import to_flat
        from chatforge.train.checkpoint import identity

        return identity({"stage": self.stage, **to_flat(self.cfg)})

    def write(self, out: Path) -> None:
        save_config(self.cfg, out / "config.yaml")
        (out / "stage").write_text(self.stage + "\n")


_pending: dict[Path, PendingRun] = {}


def start_run(cfg: Config, stage: str) -> Path:
    """Check the output dir can be written and seed every RNG (before models exist). Nothing is
    written yet: the stage's `Trainer` writes the config once the model and data are loaded and
    checked, so a run that fails before that leaves the dir (and an earlier run's files) as it was."""
    from chatforge import allocator, tracking
    from chatforge.train.dist import check_supported

    check_supported(stage, cfg.dist.strategy, cfg.dist.offload)
    tracking.check(cfg.train.report_to)
    seed_everything(cfg.train.seed)
    log(allocator.describe())
    out = Path(cfg.train.output_dir)
    check_output_dir(out)
    _pending[out.resolve()] = PendingRun(cfg, stage)
    return out


def pending_run(out: Path) -> PendingRun | None:
    """The run `start_run` registered for `out` (taken once), or None (a Trainer built directly)."""
    return _pending.pop(Path(out).resolve(), None)


def check_output_dir(out: Path) -> None:
    """`train.output_dir` is a folder (or can be made one) that this process may write."""
    from chatforge.errors import ConfigError

    for p in [out, *out.parents]:
        if p.exists():
            break
    if not p.is_dir():
        raise ConfigError(f"train.output_dir: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: {p} is not writable (read-only file system or no permission)")


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"chatforge: {msg}", flush=True)


def build_policy(cfg: Config, dropout: float | None = None):
    """(LogprobModel around the causal LM with its adapter applied, tokenizer)."""
    from chatforge.models.adapters import apply_peft, trainable_summary
    from chatforge.models.load import load_for_training, pick_device
    from chatforge.models.logprobs import LogprobModel

    lm, tok = load_for_training(cfg.model, cfg.peft.method, pick_device(cfg.train.device))
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
