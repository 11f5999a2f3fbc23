"""The one RL outer loop PPO and GRPO share: prompts per process, the stage's step, logging,
samples, checkpoints, exact resume and a save when a run stops between steps.

    for each RL step:   this process's prompts (each repeated once per answer, adjacent)
                        -> stage.step: rollout -> score -> experience -> learn (its own)
                        -> log, samples, checkpoint

A stage supplies an `RLStage`: how many prompts and answers a step takes, how many optimizer steps
it makes, its `step` function and any state of its own a checkpoint must carry (PPO's adaptive KL
controller). Everything else lives here once: the prompt slice of each process (under DDP every
process samples its own part of the step's global batch of prompts), per-answer sampler seeds
(`generate.seed_per_row`, by place in the global batch, so any generation batch size or number of
processes draws the same answers), `train.max_steps` / `train.epochs` in RL steps, periodic
checkpoints (`train.save_every` RL steps), `train.resume=true` from the newest one, and on Ctrl-C or
an error between steps (a reward function that raises) a checkpoint of the finished steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# a step's result: its metrics, and a writer of a few samples `(path, optimizer step) -> None`
StepResult = tuple[dict, Callable[[Path, int], None]]


@dataclass
class RLStage:
    """What differs between PPO and GRPO, handed to `run_loop`."""

    name: str  # "ppo" | "grpo": the checkpoint key `<name>_step`, the log and progress labels
    prompts_per_step: int  # prompts per process and step
    answers: int  # answers sampled per prompt
    updates_per_step: int  # optimizer steps per RL step
    samples_every: int  # write samples every N RL steps (0 = never)
    # step(rl_step, prompts (each repeated `answers` times), row seeds or None, progress bar)
    step: Callable[[int, list, list[int] | None, object], StepResult]
    state: Callable[[], dict] = field(default=dict)  # extra checkpoint state, after a step
    load_state: Callable[[dict], None] = field(default=lambda state: None)


def world_size() -> int:
    """Processes of this run (under torchrun / accelerate launch), known before the Trainer exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def total_steps(tcfg, n_prompts: int, prompts_per_step: int, world: int = 1) -> int:
    """RL steps: train.max_steps, else train.epochs passes over the prompts.

    >>> from types import SimpleNamespace as NS
    >>> total_steps(NS(max_steps=0, epochs=2), 20, 4, world=2), total_steps(NS(max_steps=7, epochs=1), 20, 4)
    (4, 7)
    """
    if tcfg.max_steps:
        return tcfg.max_steps
    return max(1, math.ceil(tcfg.epochs * (n_prompts // (prompts_per_step * world))))


def load_prompts(cfg, stage: str) -> list:
    """The prompts of an RL stage, tokenised and checked once the run is started (seeded, output dir
    checked) and before any model loads, so a bad record fails in seconds."""
    from chatforge.data.prompts import build_prompt_examples, prompt_budget
    from chatforge.models.load import load_tokenizer
    from chatforge.train.common import log, start_run

    start_run(cfg, stage)
    items, report = build_prompt_examples(
        cfg.data.train,
        load_tokenizer(cfg.model.path, cfg.model.trust_remote_code),
        prompt_budget(cfg.data.max_length, cfg.generate.max_new_tokens),
    )
    log(f"prompts: {report.summary()}")
    return items


def step_prompts(items, step: int, per: int, answers: int, rank: int, world: int, seed: int, per_row: bool):
    """(this process's prompts of RL step `step`, each repeated `answers` times, adjacent; their row
    seeds or None): the process's slice of the step's global batch of per x world prompts.

    >>> group, seeds = step_prompts(list("abcd"), 0, 1, 2, rank=1, world=2, seed=0, per_row=True)
    >>> len(group), group[0] == group[1], seeds[0] % 1_000_033
    (2, True, 2)
    """
    from chatforge.data.prompts import prompts_for_step

    chosen = prompts_for_step(items, step, per * world, seed)[rank * per : (rank + 1) * per]
    group = [q for q in chosen for _ in range(answers)]
    if not per_row:
        return group, None
    first = rank * len(group)  # by place in the step's global batch
    return group, [(seed * 1_000_003 + step) * 1_000_033 + first + i for i in range(len(group))]


def run_loop(trainer, stage: RLStage, items: list, steps: int, tcfg, seed_per_row: bool) -> None:
    """Run RL steps until `steps` (resuming first with `train.resume`); closes the trainer."""
    from chatforge.train.checkpoint import rng_state, set_rng_state, truncate_log
    from chatforge.train.common import log

    key, label = f"{stage.name}_step", stage.name.upper()
    samples = trainer.out / "samples.jsonl"
    start = 0
    if tcfg.resume and (state := trainer.resume()) is not None:
        start = state[key]
        stage.load_state(state)
        truncate_log(samples, trainer.step)
        log(f"resumed from {label} step {start}")
    bar = trainer.progress(initial=start * stage.updates_per_step, desc=stage.name)
    rank, world = trainer.acc.process_index, trainer.world
    done, rng, extra = start, rng_state(), stage.state()
    try:
        for step in range(start, steps):
            group, seeds = step_prompts(
                items, step, stage.prompts_per_step, stage.answers, rank, world, tcfg.seed, seed_per_row
            )
            metrics, write_samples = stage.step(step, group, seeds, bar)
            if (step + 1) % tcfg.log_every == 0 or step + 1 == steps:
                trainer.log(metrics)
            if stage.samples_every and (step + 1) % stage.samples_every == 0 and trainer.is_main:
                write_samples(samples, trainer.step)
            if (tcfg.save_every and (step + 1) % tcfg.save_every == 0) or step + 1 == steps:
                trainer.save_checkpoint({key: step + 1, **stage.state()})
            done, rng, extra = step + 1, rng_state(), stage.state()  # what a checkpoint now would hold
    except BaseException:
        # Ctrl-C or an error between steps: keep the finished steps, unless the next one had already
        # started learning (then resume from the last checkpoint)
        ckpts = trainer.checkpoints()
        saved = bool(ckpts) and ckpts[-1].name == f"step-{trainer.step}"
        if done > start and trainer.step == done * stage.updates_per_step and not saved:
            set_rng_state(rng)
            trainer.save_checkpoint({key: done, **extra, "interrupted": True})
            log(f"stopped; saved a checkpoint at {label} step {done} (train.resume=true continues)")
        raise
    finally:
        trainer.close()
