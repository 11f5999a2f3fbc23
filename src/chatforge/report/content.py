"""What the run report says, as blocks (`build(RUN)`), read only from what the pipeline left on disk:

RUN/config.yaml                the run's config: its keys that differ from the defaults are shown
RUN/eval/<label>.json          held-out answers, exact accuracy (+ reward) per model: base, sft, ppo...
RUN/eval/rm.json               reward-model pair accuracy on held-out pairs
RUN/<stage>/done               wall time, peak memory, final dir of each finished stage
RUN/<stage>/metrics.jsonl      training curves: loss, reward, KL, accuracy, tokens/s
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from chatforge.report import plots

# sft_same_time (pipeline.sft_same_time) comes last: it is compared with the model above it
SAME_TIME = "sft_same_time"
LABEL_ORDER = ["base", "pretrain", "sft", "dpo", "ppo", "grpo", SAME_TIME]
NAMES = {SAME_TIME: "SFT only, same total training time"}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def stages_of(run: Path) -> list[str]:
    """Stage folders in pipeline order (from config.yaml), else those found on disk."""
    cfg = _config(run)
    listed = list((cfg.get("pipeline") or {}).get("stages") or [])
    found = [
        p.name for p in sorted(run.iterdir()) if (p / "metrics.jsonl").is_file() or (p / "done").is_file()
    ]
    return [s for s in listed if (run / s).is_dir()] + [s for s in found if s not in listed]


def _config(run: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def evaluations(run: Path) -> dict[str, dict]:
    """label -> eval result, in pipeline order (base first, then the stages as pipeline.stages lists
    them, so each model follows the one it was trained from; sft_same_time last)."""
    found = {p.stem: _read_json(p) for p in (run / "eval").glob("*.json") if p.stem != "rm"}
    found = {k: v for k, v in found.items() if v and "exact" in v}
    rank: dict[str, int] = {}
    listed = [s for s in stages_of(run) if s != SAME_TIME]
    for i, label in enumerate(["base", *listed, *LABEL_ORDER]):
        rank.setdefault(label, i)
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], 99), kv[0])))


# ---- content -------------------------------------------------------------------------------------
def _change(before: dict, after: dict) -> str:
    """'+0.085 (+3.1 paired s.e., +2.0 unpaired)': an accuracy change and its size in noise units."""
    from chatforge.evaluate import paired_stderr

    delta = after["accuracy"] - before["accuracy"]
    unpaired = math.sqrt(before["stderr"] ** 2 + after["stderr"] ** 2)
    parts = []
    a, b = before.get("is_correct"), after.get("is_correct")
    if a and b and len(a) == len(b) and (paired := paired_stderr(a, b)):
        parts.append(f"{delta / paired:+.1f} paired s.e.")
    if unpaired:
        parts.append(f"{delta / unpaired:+.1f} unpaired")
    return f"{delta:+.3f} ({', '.join(parts)})" if parts else f"{delta:+.3f}"


def verdict(before: dict, after: dict, name: str) -> str:
    """One line in words: is this change beyond noise? (2 paired standard errors, else unpaired)

    >>> verdict({"accuracy": 0.5, "stderr": 0.05}, {"accuracy": 0.6, "stderr": 0.05}, "ppo")
    'ppo: +0.100, within noise (1.4 unpaired s.e.; beyond noise needs 2)'
    """
    from chatforge.evaluate import paired_stderr

    delta = after["accuracy"] - before["accuracy"]
    a, b = before.get("is_correct"), after.get("is_correct")
    paired = paired_stderr(a, b) if a and b and len(a) == len(b) else None
    se, kind = (paired, "paired") if paired else (math.hypot(before["stderr"], after["stderr"]), "unpaired")
    if not se:
        return f"{name}: {delta:+.3f}, no noise estimate (identical answers or no items)"
    z = delta / se
    if abs(z) < 2:
        return f"{name}: {delta:+.3f}, within noise ({abs(z):.1f} {kind} s.e.; beyond noise needs 2)"
    word = "better" if z > 0 else "worse"
    return f"{name}: {delta:+.3f}, {word} beyond noise ({abs(z):.1f} {kind} s.e.)"


def _rm_auc(result: dict) -> float | None:
    """The reward model's AUC separating this model's correct eval answers from its wrong ones."""
    from chatforge.evaluate import auc

    scores = (result.get("reward") or {}).get("scores")
    correct = result["exact"].get("is_correct")
    if not scores or not correct or len(scores) != len(correct):
        return None
    return auc([s for s, c in zip(scores, correct) if c], [s for s, c in zip(scores, correct) if not c])


def _rm_on_flips(before: dict, after: dict) -> str:
    """'k/n': on the n items one model got right and the other wrong, how often the reward model
    scored the right answer higher. A within-prompt check, so prompts that the reward model scores
    on different scales (which drag the pooled AUC toward 0.5) do not blur it.

    >>> e = lambda ok, sc: {"exact": {"is_correct": ok}, "reward": {"scores": sc}}
    >>> _rm_on_flips(e([True, False, False], [1.0, 0.0, 5.0]), e([False, True, False], [2.0, 1.0, 0.0]))
    '1/2'
    """
    a, b = before["exact"].get("is_correct"), after["exact"].get("is_correct")
    sa, sb = (before.get("reward") or {}).get("scores"), (after.get("reward") or {}).get("scores")
    if not (a and b and sa and sb) or not len(a) == len(b) == len(sa) == len(sb):
        return "-"
    flips = [(x, y, p, q) for x, y, p, q in zip(a, b, sa, sb) if x != y]
    right = sum((q > p) == y for _, y, p, q in flips)
    return f"{right}/{len(flips)}" if flips else "-"


def _same_time_note(run: Path, labels: list[str]) -> str:
    """What the 'SFT only, same total training time' row is, and what it is compared with."""
    done = _read_json(run / SAME_TIME / "done") or {}
    steps = max((r.get("step", 0) for r in read_metrics(run / SAME_TIME / "metrics.jsonl")), default=0)
    before = labels[labels.index(SAME_TIME) - 1] if labels.index(SAME_TIME) else "-"
    after = ", ".join(done.get("after") or []) or "the stages after SFT"
    return (
        f"'{NAMES[SAME_TIME]}': the SFT model trained on with SFT for {steps} more steps "
        f"({_fmt(done.get('wall_s'), 0)} s) in place of {after} ({_fmt(done.get('target_s'), 0)} s); its "
        f"change is against {before}, so a negative change there means {before} beat SFT given the same "
        "time (pipeline.sft_same_time)."
    )


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def build(run: Path) -> list[tuple]:
    """The report as blocks: ("h", level, text), ("p", text), ("table", head, rows), ("img", path),
    ("pre", language, text)."""
    blocks: list[tuple] = [("h", 1, f"chatforge run report: {run.name}")]
    cfg = _config(run)
    stages = stages_of(run)
    evals = evaluations(run)
    rm = _read_json(run / "eval" / "rm.json")
    blocks.append(("p", f"Stages: {' -> '.join(stages) or '(none yet)'}. Run folder: `{run}`."))

    blocks.append(("h", 2, "Held-out results"))
    if evals:
        rows, verdicts = [], []
        prev = None
        for label, e in evals.items():
            x = e["exact"]
            gap = flips = "-"
            if prev is not None:
                gap = _change(prev["exact"], x)
                flips = _rm_on_flips(prev, e)
                verdicts.append(verdict(prev["exact"], x, NAMES.get(label, label)))
            reward = (e.get("reward") or {}).get("mean")
            rows.append(
                [
                    NAMES.get(label, label),
                    f"{x['accuracy']:.3f} ± {x['stderr']:.3f}",
                    f"{x['correct']}/{x['n']}",
                    gap,
                    _fmt(reward),
                    _fmt(_rm_auc(e)),
                    flips,
                    _fmt(e.get("generate_tokens_per_s"), 1),
                ]
            )
            prev = e
        head = [
            "model",
            "exact accuracy ± s.e.",
            "correct",
            "change vs previous (paired s.e.)",
            "mean RM score",
            "RM AUC right vs wrong",
            "RM right where the change flips an item",
            "gen tok/s",
        ]
        blocks.append(("table", head, rows))
        if verdicts:
            blocks.append(("p", "Verdict, each model against the one above it: " + "; ".join(verdicts) + "."))
        n = next(iter(evals.values()))["exact"]["n"]
        blocks.append(
            (
                "p",
                f"{n} held-out items (greedy decoding); ± is the binomial standard error sqrt(p(1-p)/n), "
                f"at most {0.5 / math.sqrt(max(n, 1)):.3f} (at p=0.5) with these {n} items. Both models answer the same items, so a change is "
                "measured against the paired standard error of the per-item differences, and the "
                "unpaired sqrt(se_a^2 + se_b^2) is shown after it; a change beyond about 2 s.e. is "
                "beyond sampling noise. 'RM AUC' is how often the reward model scores one of this "
                "model's correct answers above one of its wrong ones, pooled over all prompts (0.5 = "
                "it cannot tell them apart; PPO can only learn what the reward model can see). 'RM right "
                "where the change flips an item' compares within a prompt: on the items this model and "
                "the previous one disagree about (one right, one wrong), how often the reward model "
                "scores the right answer higher.",
            )
        )
        if SAME_TIME in evals:
            blocks.append(("p", _same_time_note(run, list(evals))))
        tasks = sorted({t for e in evals.values() for t in e["exact"].get("per_task", {})})
        if len(tasks) > 1:
            rows = [
                [label, *[_fmt(e["exact"]["per_task"].get(t, {}).get("accuracy")) for t in tasks]]
                for label, e in evals.items()
            ]
            blocks.append(("table", ["model", *tasks], rows))
        img = plots.save(plots.accuracy_figure(evals), run / "plots" / "accuracy.png")
        if img:
            blocks.append(("img", img))
    else:
        blocks.append(("p", "No evaluation yet (set pipeline.task or pipeline.eval_data)."))
    if rm:
        blocks.append(
            (
                "p",
                f"Reward model: held-out pair accuracy {rm['pair_accuracy']:.3f} "
                f"± {math.sqrt(rm['pair_accuracy'] * (1 - rm['pair_accuracy']) / max(rm['n'], 1)):.3f} "
                f"on {rm['n']} pairs it never trained on (chosen scored above rejected).",
            )
        )

    blocks.append(("h", 2, "Stages: time, memory, throughput"))
    rows = []
    for stage in stages:
        done = _read_json(run / stage / "done") or {}
        metrics = read_metrics(run / stage / "metrics.jsonl")
        train_rows = [r for r in metrics if "tokens_per_s" in r]
        steps = max((r.get("step", 0) for r in metrics), default=0)
        status = "done" if done else "interrupted / running"
        if done.get("resumed"):
            status += " (resumed)"
        rows.append(
            [
                stage,
                status,
                str(steps),
                _fmt(done.get("wall_s"), 0),
                _fmt(done.get("peak_rss_gib"), 2),
                _fmt(_mean([r["tokens_per_s"] for r in train_rows]), 0),
                _fmt(_mean([r.get("gen_tokens_per_s") for r in metrics]), 0),
            ]
        )
    head = ["stage", "status", "steps", "wall s", "peak RSS GiB", "train tok/s", "gen tok/s"]
    blocks.append(("table", head, rows))
    eval_wall = sum(e.get("wall_s") or 0 for e in evals.values())
    total = sum((_read_json(run / s / "done") or {}).get("wall_s") or 0 for s in stages)
    blocks.append(
        (
            "p",
            f"Training wall time {total:.0f} s; evaluation wall time {eval_wall:.0f} s. Peak memory is "
            "the process's peak resident set during the stage (GPU peak too when on a GPU).",
        )
    )

    curves = [
        plots.save(plots.stage_figure(read_metrics(run / s / "metrics.jsonl"), s), run / "plots" / f"{s}.png")
        for s in stages
    ]
    if any(curves):
        blocks.append(("h", 2, "Training curves"))
        blocks += [("img", img) for img in curves if img]

    samples = int((cfg.get("pipeline") or {}).get("samples", 6))
    shown = [k for k in evals if k != SAME_TIME]
    if len(shown) > 1 and samples:
        blocks.append(("h", 2, "Sample answers, each model against the one before it"))
        for before, after in zip(shown, shown[1:]):
            blocks.append(("h", 3, f"{before} -> {after}"))
            blocks.append(
                (
                    "table",
                    ["prompt", "expected", before, after],
                    sample_rows(evals[before], evals[after], samples),
                )
            )

    if cfg:
        import yaml

        changed = non_default(cfg)
        blocks.append(("h", 2, "Config"))
        blocks.append(
            (
                "p",
                f"Reproduce the run with `chatforge pipeline {run / 'config.yaml'}` (that file holds the "
                "whole config, every default written out). The keys this run sets away from the defaults:",
            )
        )
        blocks.append(("pre", "yaml", yaml.safe_dump(changed, sort_keys=False) if changed else "{}\n"))
    return blocks


def sample_rows(before: dict, after: dict, limit: int) -> list[list[str]]:
    """Up to `limit` rows (prompt, expected, answer before, answer after) of two models' eval results,
    the items whose correctness changed first, then the rest, in file order."""
    items = _eval_items(after.get("data") or before.get("data"))
    n = min(len(before["responses"]), len(after["responses"]))
    a, b = before["exact"]["is_correct"], after["exact"]["is_correct"]
    order = sorted(range(n), key=lambda i: a[i] == b[i])
    rows = []
    for i in order[:limit]:
        prompt, answer = items[i] if i < len(items) else ("?", "?")
        rows.append([prompt, answer, _marked(before, i), _marked(after, i)])
    return rows


def non_default(cfg: dict) -> dict:
    """The sections and keys of a config tree whose values differ from the schema's defaults (keys
    the schema does not know are kept too).

    >>> non_default({"train": {"lr": 0.001, "seed": 42}, "peft": {"method": "lora"}})
    {'train': {'lr': 0.001}}
    """
    from chatforge.config import Config, to_dict

    defaults = to_dict(Config())
    out = {}
    for section, body in cfg.items():
        if not isinstance(body, dict):
            out[section] = body
            continue
        known = defaults.get(section, {})
        changed = {k: v for k, v in body.items() if k not in known or known[k] != v}
        if changed:
            out[section] = changed
    return out


def _marked(result: dict, i: int) -> str:
    return ("✓ " if result["exact"]["is_correct"][i] else "✗ ") + result["responses"][i]


def _eval_items(path: str | None) -> list[tuple[str, str]]:
    """(last user message, expected answer) of each eval record, in file order."""
    out = []
    if path and Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            p = rec.get("prompt", rec.get("messages"))
            text = p if isinstance(p, str) else (p[-1].get("content", "") if p else "")
            out.append((text, str(rec.get("answer", ""))))
    return out
