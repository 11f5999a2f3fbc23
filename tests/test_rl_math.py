"""Pure RL math against plain-Python references and hand-computed values."""

import math
import random

import pytest
import torch

from chatforge.losses.kl import kl_estimate
from chatforge.losses.policy import explained_variance, ppo_policy_loss, value_loss
from chatforge.rl.advantages import gae, group_advantages, whiten
from chatforge.rl.kl_control import AdaptiveKL, FixedKL, kl_controller


def gae_reference(rewards, values, lengths, gamma, lam):
    """The textbook loop, one sequence at a time, in plain Python floats."""
    advs, rets = [], []
    for r, v, n in zip(rewards, values, lengths):
        a = [0.0] * len(r)
        last = 0.0
        for t in reversed(range(n)):
            nv = v[t + 1] if t + 1 < n else 0.0
            last = r[t] + gamma * nv - v[t] + gamma * lam * last
            a[t] = last
        advs.append(a)
        rets.append([a[t] + v[t] if t < n else 0.0 for t in range(len(r))])
    return advs, rets


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.5)])
def test_gae_matches_python_loop_with_masks(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv))
    torch.testing.assert_close(ret, torch.tensor(ref_ret))
    assert (adv[mask == 0] == 0).all()


def test_whiten_has_zero_mean_unit_variance_on_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, mask)
    vals = w[mask.bool()]
    assert abs(float(vals.mean())) < 1e-6
    assert abs(float(vals.var(unbiased=False)) - 1) < 1e-4
    assert (w[~mask.bool()] == 0).all()
    kept = whiten(x, mask, shift_mean=False)[mask.bool()]
    assert abs(float(kept.mean()) - 3.0) < 1e-5  # mean kept, spread rescaled


def test_group_advantages_are_per_group():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4, scale=False)
    assert a.tolist() == [0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    scaled = group_advantages(r, 4)
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item()
    assert scaled[0].item() == pytest.approx(0.5 / (std + 1e-4))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_ppo_policy_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    old = torch.zeros(1, 3)  # ratios 1.5, 0.5, 1.0
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 1]])
    loss, m = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 0: min(1.5, 1.2) = 1.2; token 1: min(-0.5, -0.8) = -0.8; token 2: 2.0
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.0) / 3)
    assert m["clip_frac"].item() == pytest.approx(2 / 3)
    loss.backward()
    # clipped tokens carry no gradient; token 2: d(-ratio*A)/dlogp / 3 = -2/3
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, -2 / 3])


def test_ppo_loss_broadcasts_sequence_advantages_and_masks():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[2.0], [-1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, m = ppo_policy_loss(logp, torch.zeros(2, 3), adv, mask)
    assert loss.item() == pytest.approx(-(2 + 2 - 1) / 3)
    assert m["ratio_mean"].item() == 1.0 and m["approx_kl"].item() == 0.0
    seq, _ = ppo_policy_loss(logp, torch.zeros(2, 3), adv, mask, reduction="sequence")
    assert seq.item() == pytest.approx(-(2 - 1) / 2)


def test_ppo_loss_accumulation_matches_one_batch():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 6, generator=g).requires_grad_()
    old, adv = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).long()
    full, _ = ppo_policy_loss(logp, old, adv, mask)
    (g_full,) = torch.autograd.grad(full, logp)
    total = float(mask.sum())
    acc = torch.zeros_like(logp)
    for i in range(4):
        part, _ = ppo_policy_loss(
            logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], normalizer=total
        )
        acc += torch.autograd.grad(part, logp)[0]
    torch.testing.assert_close(acc, g_full)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, m = value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: max((1-0)^2, (0.2-0)^2) = 1; token 1: max(1, 1) = 1 -> 0.5 * mean = 0.5
    assert loss.item() == pytest.approx(0.5)
    unclipped, _ = value_loss(values, old, returns, mask, clip_eps=0)
    assert unclipped.item() == pytest.approx(0.5)
    values2 = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss2, m2 = value_loss(values2, old, torch.tensor([[1.0, 0.0]]), mask, clip_eps=0.2)
    # token 0: max(0.25, (0.2-1)^2 = 0.64) = 0.64; token 1: 0 -> 0.5 * 0.32
    assert loss2.item() == pytest.approx(0.16)
    assert m2["value_clip_frac"].item() == pytest.approx(0.5)


def test_explained_variance():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(torch.full_like(r, 2.5), r, mask).item() == pytest.approx(0.0)
    assert explained_variance(r, r, mask).item() == pytest.approx(1.0)


def test_kl_estimators():
    random.seed(0)
    lp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    r = (ref - lp)[0].tolist()
    assert kl_estimate(lp, ref, "k1")[0].tolist() == pytest.approx([-x for x in r])
    assert kl_estimate(lp, ref, "k2")[0].tolist() == pytest.approx([x * x / 2 for x in r])
    assert kl_estimate(lp, ref, "k3")[0].tolist() == pytest.approx([math.exp(x) - 1 - x for x in r])
    assert (kl_estimate(lp, lp, "k3") == 0).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(lp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    true_kl = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, ref = p.log()[samples][None], q.log()[samples][None]
    for kind in ("k1", "k3"):
        assert kl_estimate(lp, ref, kind).mean().item() == pytest.approx(true_kl, abs=0.01)


def test_kl_controllers():
    fixed = FixedKL(0.05)
    fixed.update(10.0, 100)
    assert fixed.value == 0.05
    ada = kl_controller(0.1, target=1.0, horizon=10)
    assert isinstance(ada, AdaptiveKL)
    ada.update(current_kl=0.0, n_steps=1)  # far below target: shrink by the clipped 20% / horizon
    assert ada.value == pytest.approx(0.1 * (1 - 0.2 / 10))
    state = ada.state_dict()
    fresh = kl_controller(0.1, target=1.0, horizon=10)
    fresh.load_state_dict(state)
    assert fresh.value == ada.value
