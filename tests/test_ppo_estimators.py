"""PPO with the critic-free advantage estimators (`ppo.advantage`, `ppo.samples_per_prompt`): the rule
reward rises with rloo, experience is invariant to the forward micro-batch, settings that cannot
work are refused at start-up, resume is exact, and 2 processes estimate like one."""

import json

import pytest
import torch

from chatforge.config import GenerateConfig, load_config
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.train import ppo
from conftest import one_and_two_processes, reward_that_raises
from test_ppo import PROMPTS, TIMING, config, launch_args, metrics
from test_roles import CPU, make_adapter, roles_config


def test_rloo_rule_reward_rises_without_a_critic(tiny_model_dir, jsonl, reward_file, tmp_path, capsys):
    out = tmp_path / "rloo"
    # 4 prompts x 4 answers per rollout: each answer's score against the other three of its prompt
    overrides = ("ppo.advantage=rloo", "ppo.samples_per_prompt=4", "ppo.rollout_batch_size=4")
    overrides += ("ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "train.batch_size=4", "train.lr=1e-2")
    ppo.run(config(tiny_model_dir, jsonl(PROMPTS), out, reward_file, "train.max_steps=14", *overrides))
    rows = metrics(out)
    rewards = [r["reward"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.4, rewards
    assert rows[-1]["step"] == 14 * 4  # 16 answers per rollout = 2 minibatches x 2 epochs
    assert "value_loss" not in rows[-1] and "explained_variance" not in rows[-1]
    assert not (out / "final" / "critic").exists()  # no critic was learned, none is saved
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == samples[1]["prompt"]  # a prompt's answers are adjacent


def rloo_experience(tiny_model_dir, tmp_path, jsonl, advantage, forward_batch):
    from chatforge.data.prompts import build_prompt_examples
    from chatforge.rl import experience as xp
    from chatforge.rl.build import build_roles
    from chatforge.rl.rewards import RuleRewards, Scorer

    sft = make_adapter(tiny_model_dir, tmp_path / "sft")
    roles = build_roles(roles_config(sft, f"ppo.advantage={advantage}"), CPU)
    prompts, _ = build_prompt_examples(jsonl(PROMPTS[:3]), roles.tokenizer, 64)
    group = [p for p in prompts for _ in range(2)]
    gen = xp.sample(roles, group, GenerateConfig(max_new_tokens=8), row_seeds=list(range(len(group))))
    rollout, _ = xp.score(roles, Scorer(RuleRewards(["length_penalty"]), None), group, gen)
    exp, _ = xp.make_experience(
        roles, rollout, kl_coef=0.1, batch_size=forward_batch, advantage=advantage, group_size=2
    )
    return roles, exp


@pytest.mark.parametrize("advantage", ["rloo", "reinforce_pp_baseline", "group_norm", "reinforce_pp"])
def test_group_experience_is_invariant_to_the_forward_micro_batch(tiny_model_dir, tmp_path, jsonl, advantage):
    _, one = rloo_experience(tiny_model_dir, tmp_path / "a", jsonl, advantage, 1)
    roles, six = rloo_experience(tiny_model_dir, tmp_path / "b", jsonl, advantage, 6)
    assert torch.equal(one.input_ids, six.input_ids)  # the same answers (seeded per row)
    torch.testing.assert_close(one.advantages, six.advantages, rtol=1e-5, atol=1e-6)
    assert one.advantages.abs().sum() > 0 and not one.old_values.any()
    if advantage == "rloo":  # the two answers to a prompt: opposite leave-one-out scores at the end
        last = one.response_mask.sum(1) - 1
        end = one.advantages.gather(1, last[:, None]).squeeze(1)  # actor == ref: KL 0
        torch.testing.assert_close(end[0::2], -end[1::2])
    # the learning step over these advantages is invariant to the micro-batch size, as for gae
    model = roles.model().train()
    rows = list(range(len(six)))
    total = sum(ppo.ppo_units(six.batch([r])) for r in rows)

    def grads(groups):
        model.zero_grad(set_to_none=True)
        for g in groups:
            ppo.ppo_loss(model, six.batch(g), total, vf_coef=0.0)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, split = grads([rows]), grads([[r] for r in rows])
    assert set(whole) == set(split) and any(".actor." in n for n in whole)
    for n in whole:
        torch.testing.assert_close(whole[n], split[n], rtol=1e-4, atol=1e-6, msg=n)


def test_estimator_settings_are_refused_at_start_up(
    tiny_model_dir, jsonl, reward_file, tmp_path, monkeypatch
):
    import chatforge.models.load as load

    monkeypatch.setattr(load, "load_model", None)  # any model load would fail with a TypeError
    data = jsonl(PROMPTS)
    for advantage in ("rloo", "group_norm", "reinforce_pp_baseline"):
        with pytest.raises(
            ConfigError, match=rf"ppo.advantage={advantage} compares .*ppo.samples_per_prompt >= 2"
        ):
            ppo.run(config(tiny_model_dir, data, tmp_path / "r", reward_file, f"ppo.advantage={advantage}"))
    critic = ("ppo.critic_lr=1e-3", "ppo.critic=adapter", "ppo.vf_coef=1.0")
    for setting in critic:
        with pytest.raises(
            ConfigError, match=rf"reinforce_pp learns no critic, but {setting.split('=')[0]} is set"
        ):
            ppo.run(
                config(
                    tiny_model_dir, data, tmp_path / "r", reward_file, "ppo.advantage=reinforce_pp", setting
                )
            )
    with pytest.raises(ConfigError, match="must be a multiple of ppo.mini_batch_size"):
        over = (
            "ppo.advantage=rloo",
            "ppo.samples_per_prompt=3",
            "ppo.rollout_batch_size=2",
            "ppo.mini_batch_size=4",
        )
        ppo.run(config(tiny_model_dir, data, tmp_path / "r", reward_file, *over))
    with pytest.raises(ConfigError) as e:
        ppo.run(config(tiny_model_dir, data, tmp_path / "r", reward_file, "ppo.advantage=rloo"))
    assert "\n" not in str(e.value)  # one line
    # a pipeline refuses it before its first stage (not after SFT and the reward model)
    from chatforge import pipeline

    bad = load_config(
        None, ["pipeline.stages=[sft,rm,ppo]", "pipeline.overrides={ppo: {ppo.advantage: rloo}}"]
    )
    with pytest.raises(ConfigError, match="ppo.advantage=rloo compares"):
        pipeline.check(bad)


@pytest.mark.parametrize("advantage", ["rloo", "group_norm", "reinforce_pp", "reinforce_pp_baseline"])
def test_resume_after_a_crash_is_exact_without_a_critic(
    tiny_model_dir, jsonl, reward_file, tmp_path, advantage
):
    data = jsonl(PROMPTS)
    common = (
        f"ppo.advantage={advantage}",
        "ppo.samples_per_prompt=2",
        "generate.seed_per_row=true",
        "train.max_steps=4",
        "train.save_every=3",
        "generate.max_new_tokens=8",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4",
        "train.batch_size=2",
        "ppo.kl_target=1.0",
        "ppo.kl_horizon=10",
        "ppo.samples_every=1",
    )
    ppo.run(config(tiny_model_dir, data, tmp_path / "a", reward_file, *common))
    crash = reward_that_raises(tmp_path)
    b = tmp_path / "b"
    with pytest.raises(ChatforgeError, match="disk full"):
        ppo.run(config(tiny_model_dir, data, b, crash, *common))
    ppo.run(config(tiny_model_dir, data, b, crash, *common, "train.resume=true"))

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]

    got, want = strip(metrics(b)), strip(metrics(tmp_path / "a"))
    assert [r["ppo_step"] for r in got] == [1, 2, 3, 4] and got == want
    samples = lambda d: [json.loads(x)["response"] for x in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(b) == samples(tmp_path / "a")


@pytest.mark.parametrize("advantage", ["reinforce_pp_baseline", "rloo"])
def test_two_processes_estimate_like_one_with_the_same_global_batch(
    tiny_model_dir, jsonl, reward_file, tmp_path, advantage
):
    """torchrun, 2 CPU processes x 4 prompts x 2 answers against 1 x 8 x 2: REINFORCE++ with the group
    baseline whitens over the global batch, RLOO's baseline is within a prompt's answers (on one
    process), so losses and metrics match (seed_per_row gives each answer its own random draws,
    whatever the process)."""
    data = jsonl(PROMPTS * 2, "prompts.jsonl")

    def args(out, processes):
        rollout = 8 // processes
        return launch_args(tiny_model_dir, data, out, reward_file) + [
            "generate.seed_per_row=true",
            f"ppo.advantage={advantage}",
            "ppo.samples_per_prompt=2",
            "ppo.ppo_epochs=1",
            "ppo.samples_every=0",
            "train.max_steps=3",
            f"ppo.rollout_batch_size={rollout}",
            f"ppo.mini_batch_size={2 * rollout}",
            f"train.batch_size={8 // processes}",
        ]

    a, b = one_and_two_processes("ppo", args, tmp_path)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "policy_loss", "reward", "kl", "response_length"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["ppo_step"], key)
    assert a[-1]["kl"] > 0


def test_branched_rows_give_the_experience_and_gradients_of_plain_rows(tiny_model_dir, tmp_path, jsonl):
    from chatforge.data.prompts import build_prompt_examples
    from chatforge.rl import experience as xp
    from chatforge.rl.build import build_roles
    from chatforge.rl.rewards import RuleRewards, Scorer

    sft = make_adapter(tiny_model_dir, tmp_path / "sft")
    roles = build_roles(roles_config(sft, "ppo.advantage=rloo"), CPU)
    prompts, _ = build_prompt_examples(jsonl(PROMPTS[:3]), roles.tokenizer, 64)
    group = [p for p in prompts for _ in range(3)]
    gen = xp.sample(roles, group, GenerateConfig(max_new_tokens=8), row_seeds=list(range(len(group))))
    rollout, _ = xp.score(roles, Scorer(RuleRewards(["length_penalty"]), None), group, gen)
    plain, branched = (
        xp.make_experience(roles, rollout, 0.1, batch_size=6, advantage="rloo", group_size=3, branched=b)[0]
        for b in (False, True)
    )
    for name in ("old_logp", "ref_logp", "kl", "advantages"):
        torch.testing.assert_close(getattr(plain, name), getattr(branched, name), rtol=1e-4, atol=1e-5)
    assert plain.old_logp.abs().sum() > 0
    rows = list(range(len(plain)))
    one_row = xp.experience_batch(plain, rows[:6], branched=True)
    assert one_row["input_ids"].shape[0] == 2  # 6 answers to 2 prompts: 2 rows, each prompt once
    model = roles.model().train()
    total = sum(ppo.ppo_units(plain.batch([r])) for r in rows)

    def grads(branch):
        model.zero_grad(set_to_none=True)
        for lo in (0, 6):
            batch = xp.experience_batch(plain, rows[lo : lo + 6], branched=branch)
            loss, m = ppo.ppo_loss(model, batch, total, vf_coef=0.0)
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, m

    (want, m_plain), (got, m_branched) = grads(False), grads(True)
    assert set(want) == set(got) and any(".actor." in n for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(m_branched["entropy"], m_plain["entropy"], rtol=1e-4, atol=1e-6)


def test_minibatches_are_drawn_as_before_with_each_prompts_answers_together():
    order = ppo.minibatch_order(16, seed=3, step=1, epoch=0)
    batches = ppo.minibatches(order, 8)
    assert [sorted(b) for b in batches] == [sorted(order[:8]), sorted(order[8:])]  # the same rows
    assert all(b == sorted(b) for b in batches)  # in rollout order: a prompt's answers adjacent
