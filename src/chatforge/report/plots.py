"""The report's plots: training curves (one quantity per panel, y-axis labelled with its unit) and
held-out accuracy per model, drawn with matplotlib's headless Agg backend.

`quantity(key, stage)` sorts each metric of a stage's metrics.jsonl into the panel of what it
measures (loss, reward, log-probability, KL, accuracy); keys it does not know are not drawn.
Series that repeat another one step for step (PPO's `reward`, `reward_raw` and `reward/model` are
the same numbers when nothing is clipped or added) are drawn as one line named after all of them,
so no listed series hides behind another.
"""

from __future__ import annotations

import math
from pathlib import Path

# panel -> (title, y-axis label per stage; the None entry for any other stage)
PANELS = {
    "loss": (
        "loss",
        {
            "sft": "loss (nats per token)",
            "pretrain": "loss (nats per token)",
            "sft_same_time": "loss (nats per token)",
            "rm": "loss (nats per pair)",
            "dpo": "loss (nats per pair)",
            None: "loss (objective per token)",
        },
    ),
    "reward": (
        "reward",
        {
            "rm": "reward-model score (logit)",
            "dpo": "implicit reward (β × log-ratio, nats)",
            None: "reward (score per answer)",
        },
    ),
    "logp": ("log-probability", {None: "log-probability (nats per answer)"}),
    "kl_answer": ("KL to reference", {None: "KL to reference (nats per answer)"}),
    "kl_token": ("KL to reference per token", {None: "KL to reference (nats per token)"}),
    "kl_step": ("policy change per update", {None: "KL, updated vs rollout policy (nats per token)"}),
    "accuracy": (
        "accuracy",
        {
            "rm": "pair accuracy (fraction, 0-1)",
            "dpo": "pair accuracy (fraction, 0-1)",
            None: "accuracy (fraction, 0-1)",
        },
    ),
}


def quantity(key: str, stage: str) -> str | None:
    """The panel (a key of PANELS) a metric belongs to, or None when it is not plotted.

    >>> [quantity(k, "rm") for k in ("loss", "rewards/chosen", "eval/rewards/accuracy", "lr")]
    ['loss', 'reward', 'accuracy', None]
    >>> [quantity(k, "ppo") for k in ("kl", "kl_per_token", "approx_kl", "non_score_reward", "kl_coef")]
    ['kl_answer', 'kl_token', 'kl_step', 'reward', None]
    >>> quantity("kl", "grpo")  # GRPO's KL is its per-token mean
    'kl_token'
    """
    name = key.removeprefix("eval/")
    if "accuracy" in name:
        return "accuracy"
    if name in ("loss", "nll") or name.endswith("_loss"):
        return "loss"
    if name.startswith("logps/"):
        return "logp"
    if name == "kl":
        return "kl_answer" if stage == "ppo" else "kl_token"
    if name == "kl_per_token":
        return "kl_token"
    if name == "approx_kl":
        return "kl_step"
    if name.startswith("reward") and name != "reward_std" or name == "non_score_reward":
        return "reward"
    return None


def y_label(panel: str, stage: str) -> str:
    labels = PANELS[panel][1]
    return labels.get(stage, labels[None])


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record holding a finite number for `key`."""
    return [
        (r["step"], r[key])
        for r in rows
        if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]


def merge_repeats(curves: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Curves equal to an earlier one at every step (within float32 rounding) join its name.

    >>> merge_repeats({"reward": [(1, 0.5)], "reward_raw": [(1, 0.5)], "penalty": [(1, 0.0)]})
    {'reward = reward_raw': [(1, 0.5)], 'penalty': [(1, 0.0)]}
    """
    merged: list[tuple[list[str], list[tuple[int, float]]]] = []
    for name, pts in curves.items():
        for names, other in merged:
            if len(other) == len(pts) and all(
                s == t and math.isclose(v, w, rel_tol=1e-6, abs_tol=1e-9)
                for (s, v), (t, w) in zip(pts, other)
            ):
                names.append(name)
                break
        else:
            merged.append(([name], pts))
    return {" = ".join(names): pts for names, pts in merged}


def panels(rows: list[dict], stage: str) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(panel, {series name: points}) for each panel that has data, in PANELS order."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    out = []
    for panel in PANELS:
        curves = {k: pts for k in keys if quantity(k, stage) == panel and (pts := series(rows, k))}
        if curves:
            out.append((panel, merge_repeats(curves)))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_figure(rows: list[dict], stage: str):
    """The matplotlib figure of a stage's curves (a panel per quantity), or None with nothing to draw."""
    found = panels(rows, stage)
    if not found:
        return None
    plt = _pyplot()
    cols = min(3, len(found))
    n_rows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.4 * cols, 3.2 * n_rows), squeeze=False)
    for ax, (panel, curves) in zip(axes.flat, found):
        for name, pts in curves.items():
            ax.plot(*zip(*pts), "o-" if len(pts) < 12 else "-", label=name, markersize=3, linewidth=1.2)
        ax.set_title(f"{stage}: {PANELS[panel][0]}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(y_label(panel, stage), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(found) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def accuracy_figure(evals: dict[str, dict]):
    """Held-out accuracy per model with 2-standard-error bars, or None without evaluations."""
    if not evals:
        return None
    plt = _pyplot()
    labels = list(evals)
    acc = [evals[k]["exact"]["accuracy"] for k in labels]
    err = [2 * evals[k]["exact"]["stderr"] for k in labels]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.2))
    ax.bar(labels, acc, yerr=err, capsize=4, color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_xlabel("model (after each stage)")
    ax.set_ylabel("held-out exact accuracy (fraction, 0-1)", fontsize=8)
    ax.set_title("accuracy after each stage (bars: ±2 s.e.)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig, out: Path) -> Path | None:
    """Write `fig` as a PNG and free it; None when there was no figure."""
    if fig is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    _pyplot().close(fig)
    return out
