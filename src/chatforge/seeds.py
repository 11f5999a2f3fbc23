"""The last stage of a pipeline run once per seed: `chatforge pipeline CONFIG --seeds 0,1,2 [key=value ...]`.

    RUN/seed-0/          the whole pipeline, its last stage with train.seed=0
    RUN/seed-1/ ...      the earlier stages linked from seed-0 (same data, SFT, reward model, and
                         their evaluations), only the last stage (e.g. PPO) run with train.seed=1
    RUN/seeds.md         accuracy ± s.e. of each seed's final model, its change from the stage
                         before it (in paired standard errors), and the mean over seeds

One RL run moves a few items either way with its random draws; this is how to see whether a recipe
wins on every seed or only on a lucky one. Each seed folder is an ordinary pipeline run (its own
report.md); a finished seed is skipped when the command runs again.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from chatforge.config import Config, build_config, to_flat
from chatforge.errors import ConfigError


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2].

    >>> parse_seeds("0, 1,2")
    [0, 1, 2]
    """
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes integers separated by commas, e.g. 0,1,2 (got {text!r})") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds needs distinct integers, e.g. 0,1,2 (got {text!r})")
    return seeds


def seed_config(cfg: Config, run: Path, seed: int, first: bool = True) -> Config:
    """The pipeline config of one seed: RUN/seed-S, the last stage's train.seed = S. Only the first
    seed trains `pipeline.sft_same_time`'s row: the SFT model is shared, so another seed's row would
    spend the same minutes again to answer the same question."""
    values = to_flat(cfg)
    if not first:
        values["pipeline.sft_same_time"] = False
    last = cfg.pipeline.stages[-1]
    overrides = {k: dict(v) for k, v in cfg.pipeline.overrides.items()}
    overrides.setdefault(last, {})["train.seed"] = seed
    values["pipeline.overrides"] = overrides
    values["train.output_dir"] = str(run / f"seed-{seed}")
    return build_config(values)


def share_earlier(first: Path, other: Path, stages: list[str]) -> None:
    """Link the data and every stage before the last from `first` into `other`; copy their evals."""
    other.mkdir(parents=True, exist_ok=True)
    for name in ["data", *stages[:-1]]:
        src, dst = first / name, other / name
        if src.exists() and not dst.exists():
            dst.symlink_to(src.resolve(), target_is_directory=True)
    (other / "eval").mkdir(exist_ok=True)
    for label in ["base", "rm", *stages[:-1]]:
        src = first / "eval" / f"{label}.json"
        if src.is_file() and not (other / "eval" / src.name).exists():
            shutil.copy(src, other / "eval" / src.name)


def seed_row(run: Path, stages: list[str]) -> dict | None:
    """Accuracy of the last policy stage of one seed's run, and its change from the one before."""
    from chatforge.evaluate import paired_stderr

    evals = {p.stem: json.loads(p.read_text()) for p in (run / "eval").glob("*.json")}
    labels = [s for s in ["base", *stages] if s in evals and "exact" in evals[s]]
    if len(labels) < 2 or labels[-1] != stages[-1]:
        return None
    before, after = evals[labels[-2]]["exact"], evals[labels[-1]]["exact"]
    delta = after["accuracy"] - before["accuracy"]
    a, b = before.get("is_correct"), after.get("is_correct")
    paired = paired_stderr(a, b) if a and b and len(a) == len(b) else None
    return {
        "stage": labels[-1],
        "before_stage": labels[-2],
        "before": before["accuracy"],
        "accuracy": after["accuracy"],
        "stderr": after["stderr"],
        "delta": delta,
        "paired_se": paired,
        "z": delta / paired if paired else None,
        "wall_s": json.loads((run / stages[-1] / "done").read_text()).get("wall_s"),
    }


def table(rows: dict[int, dict]) -> str:
    """A markdown table: one line per seed, then the mean and the spread of the gains."""
    first = next(iter(rows.values()))
    lines = [
        f"| seed | {first['before_stage']} | {first['stage']} | change | paired s.e. | change / paired s.e. | stage s |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, r in rows.items():
        z = f"{r['z']:+.1f}" if r["z"] is not None else "-"
        se = f"{r['paired_se']:.3f}" if r["paired_se"] else "-"
        lines.append(
            f"| {seed} | {r['before']:.3f} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {r['delta']:+.3f} "
            f"| {se} | {z} | {r['wall_s']:.0f} |"
        )
    deltas = [r["delta"] for r in rows.values()]
    mean = sum(deltas) / len(deltas)
    spread = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1)) if len(deltas) > 1 else 0.0
    acc = sum(r["accuracy"] for r in rows.values()) / len(rows)
    zs = [r["z"] for r in rows.values() if r["z"] is not None]
    lines.append(
        f"| mean | {first['before']:.3f} | {acc:.3f} | {mean:+.3f} (sd {spread:.3f} over seeds) | | "
        f"min {min(zs):+.1f} | |"
        if zs
        else f"| mean | {first['before']:.3f} | {acc:.3f} | {mean:+.3f} | | | |"
    )
    return "\n".join(lines) + "\n"


def run(cfg: Config, seeds: list[int]) -> str:
    """Run the pipeline for each seed (earlier stages shared with the first), then RUN/seeds.md."""
    from chatforge import pipeline

    pipeline.check(cfg)
    root = Path(cfg.train.output_dir).resolve()
    stages = list(cfg.pipeline.stages)
    first = root / f"seed-{seeds[0]}"
    rows = {}
    for seed in seeds:
        if seed != seeds[0]:
            share_earlier(first, root / f"seed-{seed}", stages)
        pipeline.log(f"seed {seed}: {stages[-1]} with train.seed={seed} in {root / f'seed-{seed}'}")
        pipeline.run(seed_config(cfg, root, seed, first=seed == seeds[0]))
        if (row := seed_row(root / f"seed-{seed}", stages)) is not None:
            rows[seed] = row
    out = root / "seeds.md"
    if rows:
        head = (
            f"# {stages[-1]} over {len(rows)} seeds (train.seed of the last stage; earlier stages shared)\n\n"
        )
        out.write_text(head + table(rows))
        pipeline.log(f"seeds: {out}\n{table(rows)}")
    return str(out)
