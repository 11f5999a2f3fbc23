"""`chatforge pipeline` on a tiny model: every stage folder, eval and report; skip on re-run; resume."""

import json
from pathlib import Path

import pytest

from chatforge import pipeline
from chatforge.config import load_config
from chatforge.errors import ConfigError
from chatforge.train.loop import Trainer
from test_tracking import tensorboard_scalars

SIZES = "{sft: 16, preference: 16, rl: 8, eval: 6}"


def pipeline_config(model_dir, out, *overrides):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=float32",
            "train.mixed_precision=none",
            f"train.output_dir={out}",
            "train.progress=false",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.lr=2e-2",
            "data.max_length=96",
            "pipeline.task=mixed",
            f"pipeline.task_sizes={SIZES}",
            "pipeline.eval_max_new_tokens=4",
            *overrides,
        ],
    )


def steps(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_pipeline_runs_every_stage_then_skips_them(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = pipeline_config(
        tiny_model_dir,
        run,
        "pipeline.stages=[sft, rm, ppo, dpo, grpo]",
        "generate.max_new_tokens=4",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=1",
        "pipeline.overrides={dpo: {train.max_steps: 3}, grpo: {grpo.prompts_per_step: 2, grpo.num_generations: 2}}",
    )
    report = Path(pipeline.run(cfg))
    for stage in ("sft", "rm", "ppo", "dpo", "grpo"):
        assert (run / stage / "final").is_dir() and (run / stage / "done").is_file()
        # every stage logs through train.report_to (tensorboard by default)
        assert [s for s, _ in tensorboard_scalars(run / stage / "tensorboard")["loss"]] == steps(run / stage)
    # SFT feeds the later stages through its merged adapter; the RM scores every evaluated policy.
    assert json.loads((run / "sft" / "done").read_text())["model"] == str(run / "sft" / "merged")
    ppo_cfg = load_config(run / "ppo" / "config.yaml")
    assert ppo_cfg.model.path == str(run / "sft" / "merged") and ppo_cfg.ppo.reward_model == str(
        run / "rm" / "final"
    )
    assert load_config(run / "dpo" / "config.yaml").model.path == str(run / "ppo" / "merged")
    assert load_config(run / "grpo" / "config.yaml").model.path == str(run / "dpo" / "merged")
    assert steps(run / "sft") == [1, 2] and steps(run / "dpo") == [1, 2, 3]  # per-stage override
    for label in ("base", "sft", "ppo", "dpo", "grpo"):
        result = json.loads((run / "eval" / f"{label}.json").read_text())
        assert result["exact"]["n"] == 6 and len(result["responses"]) == 6
        assert len(result["reward"]["scores"]) == 6
    assert 0 <= json.loads((run / "eval" / "rm.json").read_text())["pair_accuracy"] <= 1
    assert report == run / "report.md"
    md, page = report.read_text(), (run / "report.html").read_text()
    assert "| base |" in md and "| grpo |" in md and "pair accuracy" in md
    assert (run / "plots" / "sft.png").is_file() and page.count("data:image/png;base64,") == 6

    def must_not_run(stage, scfg):
        raise AssertionError(f"{stage} ran again")

    monkeypatch.setattr(pipeline, "run_stage", must_not_run)
    monkeypatch.setattr("chatforge.evaluate.load_inference_model", lambda *a: pytest.fail("evaluated again"))
    monkeypatch.setattr("chatforge.reward.load_reward_model", lambda *a: pytest.fail("scored again"))
    assert pipeline.run(cfg) == str(report)


def test_an_interrupted_stage_resumes_and_a_finished_one_feeds_a_new_stage(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    cfg_args = (
        tiny_model_dir,
        run,
        "train.max_steps=4",
        "train.save_every=2",
        "pipeline.eval_base=false",
    )
    cfg = pipeline_config(
        *cfg_args,
        "pipeline.stages=[sft]",
    )
    real_step = Trainer.train_step

    def step_then_interrupt(self, *args, **kwargs):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    assert not (run / "sft" / "done").exists()
    assert (run / "sft" / "checkpoints" / "step-3").is_dir()  # saved on interrupt
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    pipeline.run(cfg)
    out = capsys.readouterr().out
    assert "resuming sft" in out and "resumed from step 3" in out
    assert steps(run / "sft") == [1, 2, 3, 4]
    assert json.loads((run / "sft" / "done").read_text())["resumed"] is True
    # Adding a stage later reuses the finished SFT, merged now that a later stage starts from it.
    pipeline.run(pipeline_config(*cfg_args, "pipeline.stages=[sft, dpo]"))
    assert load_config(run / "dpo" / "config.yaml").model.path == str(run / "sft" / "merged")
    assert steps(run / "sft") == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pipeline.stages=[]"], "pipeline.stages is empty"),
        (["pipeline.stages=[sft, rl]"], "unknown stage 'rl'"),
        (["pipeline.stages=[sft, ppo, rm]"], "rm must come before ppo"),
        (["pipeline.stages=[sft]", "pipeline.overrides={sft: {train.lrr: 1}}"], "train.lrr"),
        (["pipeline.stages=[sft]", "pipeline.sft_same_time=true"], "sft_same_time needs an sft stage with"),
    ],
)
def test_bad_pipeline_configs_fail_before_any_work(tmp_path, overrides, message):
    cfg = pipeline_config("unused", tmp_path / "run", *overrides)
    with pytest.raises(ConfigError, match=message):
        pipeline.run(cfg)
    assert not (tmp_path / "run" / "data").exists()


def test_held_out_pairs_have_their_own_size(tiny_model_dir, tmp_path):
    sizes = "{sft: 4, preference: 4, rl: 4, eval: 6, preference_eval: 3}"
    cfg = pipeline_config(tiny_model_dir, tmp_path / "run", f"pipeline.task_sizes={sizes}")
    paths = pipeline.write_data(cfg, tmp_path / "run")
    lines = {k: len(v.read_text().splitlines()) for k, v in paths.items()}
    assert lines == {"sft": 4, "preference": 4, "rl": 4, "eval": 6, "preference_eval": 3}


def test_task_demos_choose_worked_steps_or_bare_answers(tiny_model_dir, tmp_path):
    def sft_answers(run, *overrides):
        cfg = pipeline_config(tiny_model_dir, run, "pipeline.task=arithmetic", *overrides)
        path = pipeline.write_data(cfg, run)["sft"]
        return [json.loads(line)["messages"][1]["content"] for line in path.read_text().splitlines()]

    worked = sft_answers(tmp_path / "steps")  # the default
    bare = sft_answers(tmp_path / "bare", "pipeline.task_demos=answer")
    assert all(" = " in a and a.startswith(tuple("0123456789")) and "The answer is" in a for a in worked)
    assert all(a.isdigit() for a in bare)
    assert [a.rsplit(" ", 1)[1].rstrip(".") for a in worked] == bare
    with pytest.raises(ConfigError, match="task_demos"):
        pipeline_config(tiny_model_dir, tmp_path / "x", "pipeline.task_demos=cot")


def test_task_slips_reach_the_written_demonstrations(tiny_model_dir, tmp_path):
    def sft_answers(run, *overrides):
        cfg = pipeline_config(tiny_model_dir, run, "pipeline.task=format", *overrides)
        path = pipeline.write_data(cfg, run)["sft"]
        return [json.loads(line)["messages"][1]["content"] for line in path.read_text().splitlines()]

    clean, slipped = sft_answers(tmp_path / "a"), sft_answers(tmp_path / "b", "pipeline.task_slips=1")
    assert len(clean) == len(slipped) and all(a != b for a, b in zip(clean, slipped))
    with pytest.raises(ConfigError, match="task_slips"):
        pipeline_config(tiny_model_dir, tmp_path / "x", "pipeline.task_slips=1.5")


def test_sft_same_time_trains_sft_on_for_the_later_stages_time(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = pipeline_config(
        tiny_model_dir,
        run,
        "pipeline.stages=[sft, rm, ppo]",
        "pipeline.sft_same_time=true",
        "generate.max_new_tokens=4",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=1",
    )
    md = Path(pipeline.run(cfg)).read_text()
    done = {s: json.loads((run / s / "done").read_text()) for s in ("sft", "rm", "ppo", "sft_same_time")}
    same = done["sft_same_time"]
    assert same["target_s"] == pytest.approx(done["rm"]["wall_s"] + done["ppo"]["wall_s"], abs=0.2)
    records = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").open()]
    paces = sorted(r["step_s"] for r in records if "eval/loss" not in r)
    assert len(paces) == 2 and all(p > 0 for p in paces)  # every logged step says its wall time
    want = pipeline.continuation_steps(same["target_s"], done["sft"]["wall_s"], 2, sum(paces) / 2)
    assert same["steps"] == want and steps(run / "sft_same_time")[-1] == want
    # it starts from the SFT model, with SFT's own data, and is evaluated like the other stages
    scfg = load_config(run / "sft_same_time" / "config.yaml")
    assert scfg.model.path == str(run / "sft" / "merged") and scfg.train.max_steps == want
    assert scfg.data.train == load_config(run / "sft" / "config.yaml").data.train
    result = json.loads((run / "eval" / "sft_same_time.json").read_text())
    assert result["exact"]["n"] == 6 and len(result["reward"]["scores"]) == 6
    assert "| SFT only, same total training time |" in md and "change is against ppo" in md
