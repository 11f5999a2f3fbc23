"""The run report from files on disk: tables, plots, samples, self-contained HTML."""

import json
import math
import re

import yaml

from chatforge import cli
from chatforge.config import load_config, save_config
from chatforge.evaluate import accuracy
from chatforge.report import write_report
from chatforge.report.plots import stage_figure

ITEMS = [{"prompt": f"What is {i} + 1? Answer with just the number.", "answer": str(i + 1)} for i in range(4)]


def _eval(run, label, responses, reward, scores=None):
    items = [{**it, "task": "units"} for it in ITEMS]  # strict: "The answer is 1." is wrong
    result = {
        "label": label,
        "data": str(run / "data" / "eval.jsonl"),
        "responses": responses,
        "exact": accuracy(items, responses),
        "reward": {"mean": reward, **({"scores": scores} if scores else {})},
        "generate_tokens_per_s": 100.0,
        "wall_s": 2.0,
    }
    (run / "eval" / f"{label}.json").write_text(json.dumps(result))


def sample_sections(md: str) -> dict[str, list[str]]:
    """'before -> after' -> the two answer cells of each row of that samples table."""
    part = md.split("## Sample answers, each model against the one before it")[1].split("\n## ")[0]
    out = {}
    for section in part.split("### ")[1:]:
        title, *lines = section.splitlines()
        rows = [line for line in lines if line.startswith("| What")]
        out[title] = [" | ".join(c.strip() for c in r.strip("|").split(" | ")[2:]) for r in rows]
    return out


def config_section(md: str) -> dict:
    """The YAML block of the report's Config section."""
    return yaml.safe_load(md.split("## Config")[1].split("```yaml\n")[1].split("```")[0])


def _metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "loss"')  # torn line


def test_report_tables_plots_samples_and_self_contained_html(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "data" / "eval.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    cfg = {"train": {"lr": 0.001}, "pipeline": {"stages": ["sft", "rm", "ppo"], "samples": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    _eval(run, "base", ["The answer is 1.", "two", "3 apples", "I think 4"], -1.0)
    _eval(run, "sft", ["1", "2", "5", "7"], 0.5, scores=[1.0, 1.0, 3.0, 0.0])
    _eval(run, "ppo", ["1", "2", "3", "7"], 1.25, scores=[2.0, 0.0, 1.0, 0.5])
    (run / "eval" / "rm.json").write_text(json.dumps({"pair_accuracy": 0.9, "n": 100}))
    _metrics(
        run / "sft" / "metrics.jsonl", [{"step": s, "loss": 3 / s, "tokens_per_s": 300.0} for s in (1, 2, 3)]
    )
    _metrics(
        run / "rm" / "metrics.jsonl", [{"step": s, "loss": 0.7, "accuracy": 0.5 + s / 10} for s in (1, 2)]
    )
    _metrics(
        run / "ppo" / "metrics.jsonl",
        [{"step": s, "reward": s / 4, "kl": s / 100, "gen_tokens_per_s": 50.0} for s in (1, 2)],
    )
    for stage, wall in (("sft", 60.0), ("rm", 30.0), ("ppo", 90.0)):
        (run / stage / "done").write_text(json.dumps({"final": "x", "wall_s": wall, "peak_rss_gib": 2.5}))

    md_path = write_report(run)
    md, page = md_path.read_text(), (run / "report.html").read_text()
    # base 0/4 -> sft 2/4 -> ppo 3/4, each change with its noise in standard errors
    se = lambda p: math.sqrt(p * (1 - p) / 4)  # noqa: E731
    # paired s.e. of the per-item differences: base->sft d=[1,1,0,0] sd/sqrt(n) = sqrt(1/12);
    # sft->ppo d=[0,0,1,0] gives 0.25. The RM ranks ppo's right answers (2, 0, 1) over its wrong
    # one (0.5) in 2 of 3 pairs, sft's right ones (1, 1) over its wrong ones (3, 0) in 2 of 4.
    # The one item the change flips (3rd: sft "5" wrong, ppo "3" right) the RM scores 3.0 for the
    # wrong answer and 1.0 for the right one: 0/1.
    assert "| base | 0.000 ± 0.000 | 0/4 | - | -1.000 | - | - |" in md
    paired = 0.5 / math.sqrt(1 / 12)
    sft_change = f"+0.500 ({paired:+.1f} paired s.e., +2.0 unpaired)"
    assert f"| sft | 0.500 ± {se(0.5):.3f} | 2/4 | {sft_change} | 0.500 | 0.500 | - |" in md
    assert f"| ppo | 0.750 ± {se(0.75):.3f} | 3/4 | +0.250 (+1.0 paired s.e., " in md
    assert "| 1.250 | 0.667 | 0/1 |" in md
    # in words: base->sft is 1.7 paired s.e., sft->ppo 1.0 (both within noise); the s.e. bound uses n=4
    assert f"sft: +0.500, within noise ({paired:.1f} paired s.e.; beyond noise needs 2)" in md
    assert "ppo: +0.250, within noise (1.0 paired s.e.; beyond noise needs 2)" in md
    assert "at most 0.250 (at p=0.5) with these 4 items" in md
    assert "pair accuracy 0.900" in md
    assert (
        "| sft | done | 3 | 60 | 2.50 | 300 | - |" in md and "| ppo | done | 2 | 90 | 2.50 | - | 50 |" in md
    )
    # curves: loss for sft, loss+accuracy for rm, reward+KL for ppo, and the accuracy bars
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(images) == ["plots/accuracy.png", "plots/ppo.png", "plots/rm.png", "plots/sft.png"]
    assert all((run / p).stat().st_size > 1000 for p in images)
    # samples: each model against the one before it, the items whose correctness changed first
    assert sample_sections(md) == {
        "base -> sft": ["✗ The answer is 1. | ✓ 1", "✗ two | ✓ 2"],
        "sft -> ppo": ["✗ 5 | ✓ 3", "✓ 1 | ✓ 1"],
    }
    # the config at the end, only what differs from the defaults; the HTML embeds every plot
    assert config_section(md) == cfg and "lr: 0.001" in page
    assert page.count('src="data:image/png;base64,') == 4 and 'src="plots' not in page


def test_sft_same_time_row_is_compared_with_the_rl_model(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "data" / "eval.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    cfg = {"pipeline": {"stages": ["sft", "rm", "ppo"], "sft_same_time": True, "samples": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    _eval(run, "sft", ["1", "2", "5", "7"], 0.5)
    _eval(run, "ppo", ["1", "2", "3", "7"], 1.0)
    _eval(run, "sft_same_time", ["1", "9", "5", "7"], 0.2)  # 1/4, below ppo's 3/4
    _metrics(run / "sft_same_time" / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in (1, 2, 3)])
    done = {"final": "x", "wall_s": 118.0, "target_s": 120.0, "steps": 3, "after": ["rm", "ppo"]}
    (run / "sft_same_time" / "done").write_text(json.dumps(done))
    md = write_report(run).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| SFT only, same total training time |"))
    # compared with the row above it, ppo: 3/4 -> 1/4, two items lost, paired s.e. 1/sqrt(6)
    assert "| 1/4 |" in row and f"-0.500 ({-0.5 / (math.sqrt(1 / 3) / 2):+.1f} paired s.e." in row
    assert "3 more steps (118 s) in place of rm, ppo (120 s)" in md and "change is against ppo" in md
    assert "| sft_same_time | done | 3 | 118 |" in md  # its steps and time in the stage table
    assert list(sample_sections(md)) == ["sft -> ppo"]  # the pipeline's own stages only


def test_models_follow_the_pipeline_order_each_against_the_one_it_was_trained_from(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "data" / "eval.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    cfg = {"pipeline": {"stages": ["sft", "ppo", "dpo"], "samples": 1}}  # dpo trains on from ppo
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for label, answers in (("base", "0000"), ("sft", "1200"), ("ppo", "1230"), ("dpo", "1234")):
        (run / label).mkdir()
        _eval(run, label, list(answers), 0.0)
    md = write_report(run).read_text()
    table = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and "/4 |" in line]
    assert table == ["| base", "| sft", "| ppo", "| dpo"]
    assert sample_sections(md) == {
        "base -> sft": ["✗ 0 | ✓ 1"],
        "sft -> ppo": ["✗ 0 | ✓ 3"],
        "ppo -> dpo": ["✗ 0 | ✓ 4"],
    }


def panel_axes(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_reward_model_panels_keep_accuracy_and_scores_apart_with_units():
    rows = [
        {"step": s, "loss": 0.7 / s, "rewards/chosen": 4.0 + s, "rewards/rejected": 2.0}
        | {"rewards/margin": 2.0 + s, "rewards/accuracy": 0.5 + s / 10, "lr": 1e-3}
        for s in (1, 2)
    ]
    axes = panel_axes(stage_figure(rows, "rm"))
    assert list(axes) == ["rm: loss", "rm: reward", "rm: accuracy"]
    assert [line.get_label() for line in axes["rm: accuracy"].lines] == ["rewards/accuracy"]
    assert [line.get_label() for line in axes["rm: reward"].lines] == [
        "rewards/chosen",
        "rewards/margin",
        "rewards/rejected",
    ]
    assert [ax.get_ylabel() for ax in axes.values()] == [
        "loss (nats per pair)",
        "reward-model score (logit)",
        "pair accuracy (fraction, 0-1)",
    ]
    assert {ax.get_xlabel() for ax in axes.values()} == {"optimizer step"}


def test_every_listed_ppo_reward_series_is_drawn():
    # reward, reward_raw and reward/model are the same numbers when nothing is clipped: drawn
    # separately, two of the four listed series hid behind the third
    rows = [
        {"step": s, "reward": r, "reward_raw": r, "reward/model": r, "non_score_reward": -0.01 * s}
        | {"kl": 0.1 * s, "kl_per_token": 0.02 * s, "approx_kl": 0.001, "kl_coef": 0.05}
        | {"loss": 0.3, "policy_loss": 0.1, "value_loss": 0.4}
        for s, r in ((1, 0.5), (2, 0.7), (3, 0.6))
    ]
    axes = panel_axes(stage_figure(rows, "ppo"))
    reward = axes["ppo: reward"]
    legend = [t.get_text() for t in reward.get_legend().get_texts()]
    assert legend == [line.get_label() for line in reward.lines]
    assert legend == ["non_score_reward", "reward = reward/model = reward_raw"]
    drawn = [tuple(line.get_ydata()) for ax in axes.values() for line in ax.lines]
    assert len(set(drawn)) == len(drawn)  # no line lies on another
    assert {title: ax.get_ylabel() for title, ax in axes.items()} == {
        "ppo: loss": "loss (objective per token)",
        "ppo: reward": "reward (score per answer)",
        "ppo: KL to reference": "KL to reference (nats per answer)",
        "ppo: KL to reference per token": "KL to reference (nats per token)",
        "ppo: policy change per update": "KL, updated vs rollout policy (nats per token)",
    }


def test_config_section_shows_the_non_default_keys_and_the_command(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"train.output_dir={run}", "train.lr=1e-3", "peft.r=16", "pipeline.stages=[sft]"]
    save_config(load_config(None, overrides), run / "config.yaml")  # every default written out
    assert cli.main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    # peft.r=16 is the default: not shown
    assert config_section(md) == {
        "train": {"output_dir": str(run), "lr": 0.001},
        "pipeline": {"stages": ["sft"]},
    }
    assert f"Reproduce the run with `chatforge pipeline {run / 'config.yaml'}`" in md
    assert cli.main(["report", str(tmp_path / "nowhere")]) != 0
    assert capsys.readouterr().err.strip().endswith("nowhere: no such run folder")
