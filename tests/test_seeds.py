"""`chatforge pipeline CONFIG --seeds 0,1,2`: the last stage once per seed, earlier stages shared."""

import json

import pytest

from chatforge.config import load_config
from chatforge.errors import ConfigError
from chatforge.seeds import parse_seeds, seed_config, seed_row, share_earlier, table


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,x", "", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_seed_config_sets_only_the_last_stage_seed(tmp_path):
    cfg = load_config(
        None,
        ["pipeline.stages=[sft,rm,ppo]", "train.seed=42", "pipeline.overrides={ppo: {train.lr: 0.0001}}"],
    )
    s = seed_config(cfg, tmp_path, 2)
    assert s.train.seed == 42 and s.train.output_dir == str(tmp_path / "seed-2")
    assert s.pipeline.overrides["ppo"] == {"train.lr": 0.0001, "train.seed": 2}
    assert cfg.pipeline.overrides["ppo"] == {"train.lr": 0.0001}  # the caller's config is untouched


def test_only_the_first_seed_trains_the_same_time_sft_row(tmp_path):
    cfg = load_config(None, ["pipeline.stages=[sft,rm,ppo]", "pipeline.sft_same_time=true"])
    assert seed_config(cfg, tmp_path, 0).pipeline.sft_same_time
    assert not seed_config(cfg, tmp_path, 1, first=False).pipeline.sft_same_time
    assert cfg.pipeline.sft_same_time


def fake_run(run, stages, correct_by_stage):
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    for stage, correct in correct_by_stage.items():
        n = len(correct)
        p = sum(correct) / n
        exact = {"accuracy": p, "stderr": (p * (1 - p) / n) ** 0.5, "n": n, "is_correct": correct}
        (run / "eval" / f"{stage}.json").write_text(json.dumps({"exact": exact}))
    for stage in stages:
        (run / stage).mkdir()
        (run / stage / "done").write_text(json.dumps({"final": str(run / stage / "final"), "wall_s": 10.0}))


def test_later_seeds_share_the_earlier_stages_and_the_table_has_each_seed_and_the_mean(tmp_path):
    stages = ["sft", "rm", "ppo"]
    sft = [True] * 6 + [False] * 4
    first = tmp_path / "seed-0"
    fake_run(first, stages, {"sft": sft, "ppo": [True] * 8 + [False] * 2})
    other = tmp_path / "seed-1"
    share_earlier(first, other, stages)
    assert (other / "sft").resolve() == (first / "sft").resolve() and (other / "rm").is_symlink()
    assert (other / "data").is_symlink() and not (other / "ppo").exists()  # the last stage runs anew
    assert json.loads((other / "eval" / "sft.json").read_text())["exact"]["is_correct"] == sft
    assert not (other / "eval" / "ppo.json").exists()
    row = seed_row(first, stages)
    assert row["before"] == 0.6 and row["accuracy"] == 0.8 and row["delta"] == pytest.approx(0.2)
    assert row["z"] == pytest.approx(0.2 / row["paired_se"])
    text = table({0: row, 1: {**row, "delta": 0.0, "accuracy": 0.6, "z": 0.0}})
    lines = text.splitlines()
    assert lines[2].startswith("| 0 | 0.600 | 0.800") and lines[3].startswith("| 1 |")
    assert lines[-1].startswith("| mean | 0.600 | 0.700 | +0.100")
