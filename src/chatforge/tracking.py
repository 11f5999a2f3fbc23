"""Experiment trackers for `train.report_to`: tensorboard (the default), wandb, mlflow, trackio, none.

Every stage logs through the shared `Trainer`, which hands each metrics record (the same numbers as
OUTPUT/metrics.jsonl) to accelerate's trackers (`Accelerator(log_with=...)`, `init_trackers`,
`log`). Where each one writes:

    tensorboard   OUTPUT/tensorboard/ (`tensorboard --logdir OUTPUT`)
    wandb         its own service; WANDB_MODE=offline keeps the run in OUTPUT/wandb/
    mlflow        MLFLOW_TRACKING_URI (mlflow's default: sqlite:///mlflow.db in the working dir)
    trackio       its local store (`trackio show`)

Each run is named after the last two parts of its output dir (`demo/sft` for a pipeline's stage)
inside the project `train.project`, and gets the run's config as its hyperparameters. A tracker
whose package is missing fails at start-up, before any model loads, naming the extra to install.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.errors import ConfigError

# name -> (module it needs, what installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "'chatforge[wandb]'"),
    "mlflow": ("mlflow", "'chatforge[mlflow]'"),
    "trackio": ("trackio", "'chatforge[trackio]'"),
}


def chosen(report_to: list[str]) -> list[str]:
    """The trackers asked for, in order, without repeats or 'none'.

    >>> chosen(["none"]), chosen(["tensorboard", "mlflow", "tensorboard"])
    ([], ['tensorboard', 'mlflow'])
    """
    return [name for name in dict.fromkeys(report_to) if name != "none"]


def check(report_to: list[str]) -> None:
    """Every tracker asked for can be imported; else a one-line error naming what to install."""
    import importlib.util

    for name in chosen(report_to):
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to: {name} needs the {module} package: pip install {install} "
                "(or train.report_to=none)"
            )


def log_with(report_to: list[str], out: Path) -> list | None:
    """What `Accelerator(log_with=...)` takes: TensorBoard as a tracker writing OUT/tensorboard (where
    chatforge has always written it), the others by name; None for no tracker."""
    from accelerate.tracking import TensorBoardTracker

    trackers = [
        TensorBoardTracker("tensorboard", str(out)) if name == "tensorboard" else name
        for name in chosen(report_to)
    ]
    return trackers or None


def run_name(out: Path) -> str:
    """'demo/sft' for OUT=runs/demo/sft.

    >>> run_name(Path("runs/demo/sft"))
    'demo/sft'
    """
    out = Path(out).absolute()
    return f"{out.parent.name}/{out.name}" if out.parent.name else out.name


def hyperparameters(config: dict) -> dict[str, bool | int | float | str]:
    """A flat config as the scalar values every tracker accepts (lists and mappings as JSON).

    >>> hyperparameters({"train.lr": 0.1, "data.train": ["a.jsonl"], "ppo.reward_model": None})
    {'train.lr': 0.1, 'data.train': '["a.jsonl"]', 'ppo.reward_model': 'None'}
    """
    return {
        k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) if v is not None else "None"
        for k, v in config.items()
    }


def start(acc, project: str, out: Path, config: dict) -> None:
    """Open this run in every tracker of `acc` (main process only) with `config` as hyperparameters."""
    name = run_name(out)
    per_tracker = {
        "wandb": {"name": name, "dir": str(out)},
        "mlflow": {"run_name": name},
        "trackio": {"name": name},
    }
    acc.init_trackers(project, config=hyperparameters(config), init_kwargs=per_tracker)


def finish(acc) -> None:
    """Close every tracker's run. Not `acc.end_training()`: that also ends the process group, which
    a later stage in the same processes still needs."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []
