"""PPO end to end on a tiny model: the reward rises and everything is logged, resume is exact, full
fine-tuning runs on separate models, two processes train like one, bad input fails clearly. Its
losses on one rollout's experience: test_ppo_experience.py."""

import json

import pytest

from chatforge.config import load_config
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.train import ppo
from conftest import one_and_two_processes, reward_that_raises

PROMPTS = [{"prompt": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)} for a in range(16)]
TIMING = ("time/", "tokens_per_s", "gen_tokens_per_s", "step_s")
SFT = [
    {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
    for i in range(8)
]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def config(model_dir, data, out, reward, *overrides):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train=[{data}]",
            f"train.output_dir={out}",
            f"ppo.reward_functions=[{reward}]",
            "train.progress=false",
            "train.warmup_ratio=0",
            "train.scheduler=constant",
            "train.lr=2e-2",
            "model.dtype=float32",
            "train.mixed_precision=none",
            "train.device=cpu",
            "peft.r=8",
            "data.max_length=96",
            "generate.max_new_tokens=12",
            "ppo.rollout_batch_size=16",
            "ppo.mini_batch_size=16",
            "ppo.ppo_epochs=1",
            "ppo.kl_coef=0.01",
            "train.batch_size=16",
            *overrides,
        ],
    )


def launch_args(model_dir, data, out, reward) -> list[str]:
    """The overrides the one- and two-process PPO runs share (the tests add the batch split)."""
    return [
        f"model.path={model_dir}",
        f"data.train=[{data}]",
        f"train.output_dir={out}",
        f"ppo.reward_functions=[{reward}]",
        "train.progress=false",
        "train.warmup_ratio=0",
        "train.lr=1e-2",
        "model.dtype=float32",
        "train.mixed_precision=none",
        "train.device=cpu",
        "peft.r=8",
        "data.max_length=96",
        "generate.max_new_tokens=8",
    ]


@pytest.mark.parametrize("critic", ["adapter", "head"])
def test_rule_reward_rises_and_everything_is_logged(
    critic, tiny_model_dir, jsonl, reward_file, tmp_path, capsys
):
    out = tmp_path / "run"
    # real PPO: 2 epochs x 2 shuffled minibatches of 8 per rollout of 16, 2 micro-batches each
    overrides = ("ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "train.batch_size=4", "train.lr=1e-2")
    overrides += (f"ppo.critic={critic}",)
    final = ppo.run(
        config(tiny_model_dir, jsonl(PROMPTS), out, reward_file, "train.max_steps=14", *overrides)
    )
    assert "PPO layout: lean" in capsys.readouterr().out
    rows = metrics(out)
    rewards = [r["reward"] for r in rows]
    # where the reward takes off varies with the CPU's kernels (step 11 of 14 on an AVX-512 EPYC)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.3 and last > first + 0.4, str(rewards)
    want = {"loss", "reward", "reward_std", "reward/has_seven", "kl", "kl_coef", "entropy", "clip_frac"}
    want |= {"approx_kl", "value_loss", "explained_variance", "response_length", "gen_tokens_per_s"}
    want |= {"time/generate", "time/score", "time/learn", "ppo_step", "policy_loss", "ratio_mean"}
    assert want <= set(rows[-1]), want - set(rows[-1])
    assert rows[-1]["kl"] > 0 and rows[-1]["explained_variance"] != 0
    assert rows[-1]["step"] == 14 * 4 and max(r["clip_frac"] for r in rows) > 0  # later epochs clip
    assert (out / "final" / "adapter_config.json").is_file() and final == str(out / "final")
    # the critic: its own adapter, or only a value head on the actor
    assert (out / "final" / "critic" / "adapter_config.json").is_file() == (critic == "adapter")
    assert (out / "final" / "critic" / "value_head.safetensors").is_file()
    from chatforge.models.adapters import load_adapter_model

    assert load_adapter_model(out / "final").peft_config["default"].r == 8  # loads as a plain adapter
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "response", "score", "raw_score", "stopped", "answer"} <= set(samples[0])


def test_resume_after_a_crash_is_exact(tiny_model_dir, jsonl, reward_file, tmp_path):
    data = jsonl(PROMPTS)
    common = (
        "train.max_steps=4",
        "train.save_every=3",
        "generate.max_new_tokens=8",
        "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=1",
        "train.batch_size=2",
        "ppo.kl_target=1.0",
        "ppo.kl_horizon=10",
        "ppo.ptx_coef=0.1",
        f"ppo.ptx_data=[{jsonl(SFT, 'sft.jsonl')}]",
        "ppo.critic_lr=1e-2",
        "ppo.samples_every=1",
    )
    ppo.run(config(tiny_model_dir, data, tmp_path / "a", reward_file, *common))

    crash = reward_that_raises(tmp_path)
    b = tmp_path / "b"
    with pytest.raises(ChatforgeError, match="reward function .*has_seven' raised RuntimeError: disk full"):
        ppo.run(config(tiny_model_dir, data, b, crash, *common))
    assert [r["ppo_step"] for r in metrics(b)] == [1, 2]
    # save_every=3, but the two finished steps were checkpointed when the reward function raised
    assert json.loads((b / "checkpoints" / "step-4" / "state.json").read_text())["ppo_step"] == 2
    ppo.run(config(tiny_model_dir, data, b, crash, *common, "train.resume=true"))

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]

    got, want = strip(metrics(b)), strip(metrics(tmp_path / "a"))
    assert [r["ppo_step"] for r in got] == [1, 2, 3, 4] and got[-1]["step"] == 8
    assert got == want
    assert got[-1]["kl_coef"] != 0.05  # the adaptive controller moved, and its state resumed
    samples = lambda d: [json.loads(x)["response"] for x in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(b) == samples(tmp_path / "a")


def test_full_finetuning_uses_separate_models(tiny_model_dir, jsonl, reward_file, tmp_path, capsys):
    out = tmp_path / "full"
    overrides = ("peft.method=none", "train.lr=1e-4", "train.max_steps=2", "ppo.rollout_batch_size=8")
    ppo.run(config(tiny_model_dir, jsonl(PROMPTS), out, reward_file, *overrides, "ppo.mini_batch_size=8"))
    assert "separate models" in capsys.readouterr().out
    rows = metrics(out)
    assert len(rows) == 2 and rows[1]["kl"] > 0  # the actor moved away from its frozen copy
    assert (out / "final" / "config.json").is_file() and not (out / "final" / "adapter_config.json").exists()


def test_bad_prompts_and_config_fail_before_any_model_loads(
    tiny_model_dir, jsonl, reward_file, tmp_path, monkeypatch
):
    import chatforge.models.load as load

    monkeypatch.setattr(load, "load_model", None)  # any model load would fail with a TypeError
    bad = jsonl([{"prompt": "ok"}, {"messages": [{"role": "assistant", "content": "hi"}]}], "bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:2: messages must end with a user turn"):
        ppo.run(config(tiny_model_dir, bad, tmp_path / "r", reward_file))
    empty = jsonl([{"prompt": "ok"}, {"prompt": ""}], "empty.jsonl")
    with pytest.raises(DataError, match=r"empty.jsonl:2: prompt must be a non-empty string"):
        ppo.run(config(tiny_model_dir, empty, tmp_path / "r", reward_file))
    with pytest.raises(ConfigError, match="multiple of ppo.mini_batch_size"):
        ppo.run(config(tiny_model_dir, jsonl(PROMPTS), tmp_path / "r", reward_file, "ppo.mini_batch_size=5"))
    with pytest.raises(ConfigError, match="ppo needs a reward"):
        ppo.run(load_config(None, [f"model.path={tiny_model_dir}", f"data.train=[{jsonl(PROMPTS)}]"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # two processes x 16 prompts each, but only 16 prompts
    with pytest.raises(ConfigError, match=r"rollout_batch_size \(16\) x 2 processes exceeds the 16 prompts"):
        ppo.run(config(tiny_model_dir, jsonl(PROMPTS), tmp_path / "r", reward_file))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="ptx_data"):
        ppo.run(config(tiny_model_dir, jsonl(PROMPTS), tmp_path / "r", reward_file, "ppo.ptx_coef=0.5"))


def test_two_processes_train_like_one_with_the_same_global_batch(
    tiny_model_dir, jsonl, reward_file, tmp_path
):
    """torchrun, 2 CPU processes x 8 prompts against 1 process x 16: the same prompts, answers (top_k=1
    sampling is deterministic), losses and metrics, with the critic adapter and the SFT (ptx) mix."""
    data = jsonl(PROMPTS * 2, "prompts.jsonl")
    # SFT records of one token length: the ptx term is each process's own token mean, which
    # averages to the global one only when the token counts match
    sft = jsonl(SFT[1:] + [SFT[1]], "sft.jsonl")

    def args(out, processes):  # the same global rollout of 16 prompts, micro-batches of 8
        rollout, batch = 16 // processes, 8 // processes
        return launch_args(tiny_model_dir, data, out, reward_file) + [
            "generate.top_k=1",
            "ppo.whiten_advantages=false",
            "ppo.ppo_epochs=1",
            "ppo.samples_every=0",
            "ppo.ptx_coef=0.2",
            f"ppo.ptx_data=[{sft}]",
            "train.max_steps=3",
            f"ppo.rollout_batch_size={rollout}",
            f"ppo.mini_batch_size={rollout}",
            f"train.batch_size={batch}",
        ]

    a, b = one_and_two_processes("ppo", args, tmp_path)
    assert len(a) == len(b) == 3
    keys = ("loss", "policy_loss", "value_loss", "reward", "kl", "response_length", "value_mean")
    for x, y in zip(a, b):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["ppo_step"], key)
    assert a[-1]["kl"] > 0  # the actor moved, the same way in both
