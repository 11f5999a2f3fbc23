"""PPO's losses on one rollout's experience from a tiny model: the head critic, rewards from KL,
score and EOS penalty, the first ratio, checkpointed layers under their adapters, the split loss,
accumulation, the pretraining mix, rounded batch widths."""

import pytest
import torch

from chatforge.config import GenerateConfig
from chatforge.train import loop, ppo
from test_ppo import PROMPTS
from test_roles import CPU, make_adapter, roles_config  # tests/ is on sys.path (rootdir conftest)


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
