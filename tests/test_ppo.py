"""PPO on a tiny model: the reward rises, the first ratio is 1, accumulation is invariant to the
micro-batch size, resume is exact, full fine-tuning runs on separate models, bad input fails clearly."""

import json

import pytest
import torch

from chatforge.config import GenerateConfig, load_config
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.train import loop, ppo
from conftest import one_and_two_processes, reward_that_raises
from test_roles import CPU, make_adapter, roles_config  # tests/ is on sys.path (rootdir conftest)

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


def one_rollout(model_dir, tmp_path, jsonl, *overrides):
    """(roles, experience) of one rollout from an SFT adapter start (non-zero LoRA weights)."""
    from chatforge.data.prompts import build_prompt_examples
    from chatforge.rl import experience as xp
    from chatforge.rl.build import build_roles
    from chatforge.rl.rewards import RuleRewards, Scorer

    sft = make_adapter(model_dir, tmp_path / "sft")
    roles = build_roles(roles_config(sft, *overrides), CPU)
    with torch.no_grad():
        roles.critic.head.weight.normal_(0, 0.1)
    prompts, _ = build_prompt_examples(jsonl(PROMPTS[:4]), roles.tokenizer, 64)
    torch.manual_seed(0)
    gen = xp.sample(roles, prompts, GenerateConfig(max_new_tokens=8))
    scorer = Scorer(RuleRewards(["length_penalty"]), None)
    rollout, _ = xp.score(roles, scorer, prompts, gen, missing_eos_penalty=0.5)
    exp, stats = xp.make_experience(roles, rollout, kl_coef=0.1, batch_size=2)
    return roles, exp


@pytest.fixture
def experience(tiny_model_dir, tmp_path, jsonl):
    return one_rollout(tiny_model_dir, tmp_path, jsonl)


def test_head_critic_reads_the_actor_and_its_loss_moves_only_the_head(tiny_model_dir, tmp_path, jsonl):
    roles, exp = one_rollout(tiny_model_dir, tmp_path, jsonl, "ppo.critic=head")
    assert "critic" not in roles.adapters and "value head on the actor" in roles.describe()
    assert not any(".critic." in n for n, _ in roles.policy.lm.named_parameters())  # no critic adapter
    b = exp.batch([0, 1, 2, 3])
    R = exp.response_mask.shape[1]
    with torch.no_grad(), roles.use("actor"):
        _, _, hidden = roles.policy(
            b["input_ids"], b["attention_mask"], b["position_ids"], return_hidden=True
        )
    want = roles.critic.read(hidden[:, -R:]) * exp.response_mask
    assert want.abs().sum() > 0
    torch.testing.assert_close(exp.old_values, want)
    model = roles.model().train()

    def grads(vf_coef):
        model.zero_grad(set_to_none=True)
        exp.returns = exp.old_values + 1.0  # a value error to learn from
        ppo.ppo_loss(model, exp.batch([0, 1, 2, 3]), None, vf_coef=vf_coef)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_values, without = grads(1.0), grads(0.0)
    head = "critic.head.weight"
    assert with_values[head].abs().sum() > 0 and without.get(head, torch.zeros(1)).abs().sum() == 0
    actor = [n for n in without if ".actor." in n]
    assert actor and all(torch.equal(with_values[n], without[n]) for n in actor)


def test_experience_rewards_follow_kl_score_and_eos_penalty(experience):
    roles, exp = experience
    B, R = exp.response_mask.shape
    assert exp.input_ids.shape == exp.attention_mask.shape == exp.position_ids.shape
    for name in ("old_logp", "ref_logp", "old_values", "kl", "rewards", "advantages", "returns"):
        assert getattr(exp, name).shape == (B, R), name
    # the actor starts as the SFT adapter, which is also the reference: KL 0 everywhere
    assert torch.equal(exp.old_logp, exp.ref_logp) and not exp.kl.any()
    last = exp.response_mask.sum(1) - 1
    want = torch.zeros(B, R).scatter(1, last[:, None], exp.scores[:, None])
    assert torch.equal(exp.rewards, want)
    text_len = torch.tensor(
        [
            float(len(t))
            for t in roles.tokenizer.batch_decode(
                exp.input_ids[:, -R:].masked_fill(exp.response_mask == 0, roles.tokenizer.pad_token_id),
                skip_special_tokens=True,
            )
        ]
    )
    from chatforge.data.templates import stop_token_ids

    last_token = exp.input_ids[:, -R:].gather(1, last[:, None]).squeeze(1)
    stopped = torch.isin(last_token, torch.tensor(stop_token_ids(roles.tokenizer)))
    assert exp.scores == pytest.approx((-(text_len / 200).clamp(max=1) - 0.5 * (~stopped).float()).tolist())
    m = exp.response_mask.bool()
    assert float(exp.advantages[m].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(exp.advantages[m].std(correction=0)) == pytest.approx(1.0, abs=1e-3)
    assert not exp.advantages[~m].any() and not exp.returns[~m].any()


def test_first_ratio_is_one(experience):
    roles, exp = experience
    model = roles.model().train()
    for rows in ([0, 1, 2, 3], [3, 0]):  # the rollout's micro-batches, and a reshuffled one
        _, m = ppo.ppo_loss(model, exp.batch(rows), None)
        assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
        assert float(m["approx_kl"]) < 1e-10 and float(m["clip_frac"]) == 0.0


@pytest.mark.parametrize("split", [False, True])
def test_checkpointed_layers_replay_under_their_own_adapter(tiny_model_dir, tmp_path, jsonl, split):
    # actor and critic are adapters on one base: with gradient checkpointing each layer is
    # recomputed during backward, when the critic (or no role) may be active; the gradients must
    # still be those of the run without checkpointing, for the joint loss and the split one
    def grads(*overrides, split=False):
        torch.manual_seed(0)
        roles, exp = one_rollout(tiny_model_dir, tmp_path / str(len(overrides)), jsonl, *overrides)
        model = roles.model().train()
        exp.returns = exp.old_values + 1.0  # a value error, so the critic adapter gets a gradient
        for loss, _ in loop.loss_parts(ppo.ppo_loss(model, exp.batch([0, 1, 2, 3]), None, split=split)):
            loss.backward()
        return roles, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    _, plain = grads()
    roles, ckpt = grads("model.gradient_checkpointing=true", split=split)
    assert roles.policy.lm.base_model.model.is_activation_checkpointing
    assert (
        set(plain) == set(ckpt) and any(".critic." in n for n in plain) and any(".actor." in n for n in plain)
    )
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of tensors autograd holds for backward, and their peak, while active."""

    def __init__(self):
        self.live = self.peak = 0
        meter = self

        class Held:
            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                meter.live += self.n
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= self.n

        super().__init__(Held, lambda held: held.t)


def test_split_loss_frees_the_actor_graph_before_the_critic_runs(experience):
    roles, exp = experience
    model = roles.model().train()
    exp.returns = exp.old_values + 1.0
    b = exp.batch([0, 1, 2, 3])

    def run(split):
        model.zero_grad(set_to_none=True)
        losses, metrics, saved = [], {}, SavedBytes()
        with saved:
            for loss, m in loop.loss_parts(ppo.ppo_loss(model, b, None, split=split)):
                loss.backward()
                losses.append(float(loss.detach()))
                metrics.update({k: float(v) for k, v in m.items()})
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return sum(losses), metrics, grads, saved.peak

    joint, split = run(False), run(True)
    assert split[0] == pytest.approx(joint[0], rel=1e-6) and split[1] == pytest.approx(joint[1], rel=1e-6)
    assert set(split[2]) == set(joint[2]) and any(".critic." in n for n in joint[2])
    for n, g in joint[2].items():
        torch.testing.assert_close(split[2][n], g, rtol=1e-5, atol=1e-7, msg=n)
    assert split[3] < 0.75 * joint[3]  # one role's activations alive at a time, not both


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_accumulation_is_invariant_to_micro_batch_size(experience, reduction):
    roles, exp = experience
    model = roles.model().train()
    assert exp.advantages.abs().sum() > 0 and exp.returns.abs().sum() > 0
    rows = [0, 1, 2, 3]
    total = sum(ppo.ppo_units(exp.batch([r]), reduction) for r in rows)

    def grads(groups):
        model.zero_grad(set_to_none=True)
        for g in groups:
            loss, _ = ppo.ppo_loss(model, exp.batch(g), total, reduction=reduction)
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    one, four = grads([rows]), grads([[r] for r in rows])
    assert set(one) == set(four) and any(".actor." in n for n in one) and "critic.head.weight" in one
    for n in one:
        assert torch.allclose(one[n], four[n], rtol=1e-4, atol=1e-6), n


def test_ptx_batch_adds_its_own_mean_nll(experience, tokenizer):
    from chatforge.data.collate import pad_batch

    roles, _ = experience
    model = roles.model()
    b = pad_batch([{"input_ids": tokenizer.encode("one two three")}], tokenizer.pad_token_id)
    b["ptx"] = 0.5
    loss, _ = ppo.ppo_loss(model, b, 123.0)
    with torch.no_grad(), roles.use("actor"):
        lp, _ = model.policy(b["input_ids"], b["attention_mask"], b["position_ids"])
    assert float(loss.detach()) == pytest.approx(0.5 * float(-lp.mean()), rel=1e-5)
    assert ppo.ppo_units(b) == 0  # it does not change the PPO normalizer


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


def test_batches_round_their_width_and_keep_the_loss(experience):
    """`Experience.batch(..., pad_to_multiple_of=m)`: the width rounded up to a multiple of m with
    padding columns, the same loss and metrics as the tight batch."""
    roles, exp = experience
    full = exp.input_ids.shape[1]
    # a row whose tight batch has room to grow: shorter prompt or response than the longest
    row, m = next(
        (r, m)
        for r in range(len(exp))
        for m in (3, 4, 5, 6, 7)
        if (w := exp.batch([r])["input_ids"].shape[1]) % m and -(-w // m) * m <= full
    )
    rows = [row]
    tight = exp.batch(rows)
    w = tight["input_ids"].shape[1]
    padded = exp.batch(rows, pad_to_multiple_of=m)
    assert padded["input_ids"].shape[1] == -(-w // m) * m
    assert padded["num_tokens"] == tight["num_tokens"]
    model = roles.model().eval()
    with torch.no_grad():
        (loss_t, metrics_t), (loss_p, metrics_p) = (ppo.ppo_loss(model, b, None) for b in (tight, padded))
    torch.testing.assert_close(loss_p, loss_t, atol=1e-5, rtol=1e-5)
    for k in ("clip_frac", "approx_kl", "entropy"):
        if k in metrics_t:
            torch.testing.assert_close(metrics_p[k], metrics_t[k], atol=1e-5, rtol=1e-5)
