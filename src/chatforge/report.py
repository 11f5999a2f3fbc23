"""The run report: `RUN/report.md` and a self-contained `RUN/report.html` (plots embedded as base64).

`write_report(RUN)` reads only what the pipeline left on disk, so it can be re-run at any time
(`python -m chatforge.report RUN`):

    RUN/config.yaml                the exact config, shown at the end
    RUN/eval/<label>.json          held-out answers, exact accuracy (+ reward) per model: base, sft, ppo...
    RUN/eval/rm.json               reward-model pair accuracy on held-out pairs
    RUN/<stage>/done               wall time, peak memory, final dir of each finished stage
    RUN/<stage>/metrics.jsonl      training curves: loss, reward, KL, accuracy, tokens/s

Plots are PNGs drawn with matplotlib's headless Agg backend into `RUN/plots/`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path

# Curve groups: a metric key joins the first group whose test it passes.
CURVES = [
    ("loss", lambda k: k == "loss" or k.endswith("/loss") or k.endswith("_loss")),
    ("reward", lambda k: "reward" in k and "std" not in k and "/rejected" not in k),
    ("KL", lambda k: "kl" in k.lower() and "coef" not in k),
    ("accuracy", lambda k: "acc" in k),
]
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
    """label -> eval result, in pipeline order (base first)."""
    found = {p.stem: _read_json(p) for p in (run / "eval").glob("*.json") if p.stem != "rm"}
    found = {k: v for k, v in found.items() if v and "exact" in v}
    rank = {label: i for i, label in enumerate(LABEL_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], 99), kv[0])))


# ---- plots ---------------------------------------------------------------------------------------
def plot_stage(rows: list[dict], title: str, out: Path) -> Path | None:
    """One PNG with a panel per curve group found in `rows`; None when there is nothing to draw."""
    groups = []
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    for name, test in CURVES:
        members = [k for k in keys if test(k) and not any(k in g for _, g in groups)]
        if members:
            groups.append((name, members[:6]))
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, (name, members) in zip(axes[0], groups):
        for k in members:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and "step" in r]
            pts = [(s, v) for s, v in pts if math.isfinite(v)]
            if pts:
                style = "o-" if len(pts) < 12 else "-"
                ax.plot(*zip(*pts), style, label=k, markersize=3, linewidth=1.2)
        ax.set_title(f"{title}: {name}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_accuracy(evals: dict[str, dict], out: Path) -> Path | None:
    """Held-out accuracy per model with 2-standard-error bars."""
    if not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(evals)
    acc = [evals[k]["exact"]["accuracy"] for k in labels]
    err = [2 * evals[k]["exact"]["stderr"] for k in labels]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.2))
    ax.bar(labels, acc, yerr=err, capsize=4, color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out exact accuracy")
    ax.set_title("accuracy after each stage (bars: ±2 s.e.)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


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
    ("pre", text)."""
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
        img = plot_accuracy(evals, run / "plots" / "accuracy.png")
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
        (s, plot_stage(read_metrics(run / s / "metrics.jsonl"), s, run / "plots" / f"{s}.png"))
        for s in stages
    ]
    if any(img for _, img in curves):
        blocks.append(("h", 2, "Training curves"))
        blocks += [("img", img) for _, img in curves if img]

    samples = int((cfg.get("pipeline") or {}).get("samples", 6))
    if len(evals) > 1 and samples:
        shown = [k for k in evals if k != SAME_TIME]
        first, last = shown[0], shown[-1]
        a, b = evals[first], evals[last]
        items = _eval_items(a.get("data"))
        # Prefer items whose correctness changed, then the rest, in file order.
        order = sorted(
            range(min(len(a["responses"]), len(b["responses"]))),
            key=lambda i: a["exact"]["is_correct"][i] == b["exact"]["is_correct"][i],
        )
        rows = []
        for i in order[:samples]:
            prompt, answer = items[i] if i < len(items) else ("?", "?")
            rows.append([prompt, answer, _marked(a, i), _marked(b, i)])
        blocks.append(("h", 2, f"Sample answers: {first} vs {last}"))
        blocks.append(("table", ["prompt", "expected", first, last], rows))

    if cfg:
        import yaml

        blocks.append(("h", 2, "Exact config"))
        blocks.append(("pre", yaml.safe_dump(cfg, sort_keys=False)))
    return blocks


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


# ---- rendering -----------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple], run: Path) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[1]} {b[2]}\n")
        elif b[0] == "p":
            out.append(f"{b[1]}\n")
        elif b[0] == "table":
            out.append("| " + " | ".join(map(_md_cell, b[1])) + " |")
            out.append("|" + "---|" * len(b[1]))
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2]]
            out.append("")
        elif b[0] == "img":
            out.append(f"![{b[1].stem}]({b[1].relative_to(run)})\n")
        elif b[0] == "pre":
            out.append(f"```yaml\n{b[1]}```\n")
    return "\n".join(out)


def to_html(blocks: list[tuple]) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(c))}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode()
            body.append(f'<img alt="{e(b[1].stem)}" src="data:image/png;base64,{data}">')
        elif b[0] == "pre":
            body.append(f"<pre>{e(b[1])}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px;text-align:left}img{max-width:100%;display:block;margin:1em 0}"
        "pre{background:#f6f6f6;padding:1em;font-size:12px;overflow:auto}"
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>chatforge report</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def held_out_line(stage: str, evals: dict[str, dict], rm: dict | None) -> str | None:
    """The stage's held-out result in one line, for its model card; None when not evaluated."""
    if stage == "rm" and rm:
        return f"pair accuracy {rm['pair_accuracy']:.3f} on {rm['n']} held-out preference pairs"
    if stage not in evals:
        return None
    x = evals[stage]["exact"]
    line = f"exact accuracy {x['accuracy']:.3f} ± {x['stderr']:.3f} on {x['n']} items"
    labels = list(evals)
    at = labels.index(stage)
    if at:
        line += f", {_change(evals[labels[at - 1]]['exact'], x)} vs {labels[at - 1]}"
    return line


def update_cards(run: Path) -> None:
    """Re-write each stage's final/README.md with its held-out result from this report."""
    from chatforge.card import write_card

    evals, rm = evaluations(run), _read_json(run / "eval" / "rm.json")
    for stage in stages_of(run):
        final = run / stage / "final"
        if final.is_dir():
            write_card(final, run / stage, held_out_line(stage, evals, rm))


def write_report(run: str | Path) -> Path:
    """Write RUN/report.md and RUN/report.html (atomically), and refresh the stages' model cards;
    returns the .md path."""
    run = Path(run)
    blocks = build(run)
    update_cards(run)
    md, page = run / "report.md", run / "report.html"
    for path, text in ((md, to_markdown(blocks, run)), (page, to_html(blocks))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return md


if __name__ == "__main__":
    print(write_report(sys.argv[1] if len(sys.argv) > 1 else "."))
