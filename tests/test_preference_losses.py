"""Preference losses against hand-computed values: DPO, cDPO, IPO, hinge, SimPO, SFT term, reward loss."""

import math

import pytest
import torch

from chatforge.config import DPOConfig
from chatforge.losses.preference import PREFERENCE_LOSSES, preference_loss, reward_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# policy chosen/rejected -1/-3, reference -2/-2: h = (-1 + 2) - (-3 + 2) = 2
PAIR = dict(policy_chosen=t(-1.0), policy_rejected=t(-3.0), ref_chosen=t(-2.0), ref_rejected=t(-2.0))


def nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


@pytest.mark.parametrize(
    "name, kw, want",
    [
        ("sigmoid", dict(beta=0.5), nls(1.0)),  # beta h = 1
        ("sigmoid", dict(beta=0.5, label_smoothing=0.1), 0.9 * nls(1.0) + 0.1 * nls(-1.0)),
        ("ipo", dict(beta=0.5), (2 - 1) ** 2),  # (h - 1/(2 beta))^2
        ("ipo", dict(beta=0.1), (2 - 5) ** 2),
        ("hinge", dict(beta=0.25), 0.5),  # max(0, 1 - beta h)
        ("hinge", dict(beta=1.0), 0.0),
    ],
)
def test_reference_losses_match_hand_values(name, kw, want):
    loss, m = preference_loss(name, **PAIR, **kw)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-7)
    beta = kw["beta"]
    assert float(m["rewards/chosen"]) == pytest.approx(beta * 1.0)
    assert float(m["rewards/rejected"]) == pytest.approx(beta * -1.0)
    assert float(m["rewards/margin"]) == pytest.approx(2 * beta)
    assert float(m["rewards/accuracy"]) == 1.0
    assert float(m["logps/chosen"]) == -1.0 and float(m["logps/rejected"]) == -3.0


def test_simpo_is_reference_free_with_margin():
    # mean log-probs -0.5 / -1.5, beta 2, gamma 0.5: -log sigmoid(2 * 1 - 0.5)
    loss, m = preference_loss("simpo", t(-0.5), t(-1.5), beta=2.0, gamma=0.5)
    assert float(loss) == pytest.approx(nls(1.5), rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(-1.0) and float(m["rewards/margin"]) == pytest.approx(
        2.0
    )


def test_equal_policy_and_reference_gives_the_step_zero_values():
    same = dict(policy_chosen=t(-4.0, -7.0), policy_rejected=t(-5.0, -2.0))
    ref = dict(ref_chosen=same["policy_chosen"], ref_rejected=same["policy_rejected"])
    assert float(preference_loss("sigmoid", **same, **ref, beta=0.3)[0]) == pytest.approx(math.log(2))
    assert float(preference_loss("ipo", **same, **ref, beta=0.1)[0]) == pytest.approx(25.0)


def test_normalizer_and_sft_term():
    pc, pr, rc, rr = t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)
    per_pair = [nls(0.5 * 2), nls(0.0)]
    loss, _ = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.5, normalizer=4)
    assert float(loss) == pytest.approx(sum(per_pair) / 4, rel=1e-6)  # the global pair count
    nll = t(0.25, 0.75)
    loss, m = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.5, sft_nll=nll, sft_weight=2.0)
    assert float(loss) == pytest.approx((sum(per_pair) + 2.0 * 1.0) / 2, rel=1e-6)
    assert float(m["nll"]) == pytest.approx(0.5)


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    loss, _ = preference_loss("sigmoid", pc, pr, t(-2.0), t(-2.0), beta=0.1)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


def test_reward_loss_with_margin_and_centring():
    loss, m = reward_loss(t(2.0, 0.0), t(1.0, 1.0), margin=t(0.5, 0.0), center_coef=0.1)
    want = (nls(0.5) + 0.1 * 9) + (nls(-1.0) + 0.1 * 1)
    assert float(loss) == pytest.approx(want / 2, rel=1e-6)
    assert float(m["rewards/accuracy"]) == 0.5
    assert float(m["rewards/margin"]) == pytest.approx(0.0)
    assert float(m["rewards/chosen"]) == pytest.approx(1.0) and float(m["rewards/rejected"]) == pytest.approx(
        1.0
    )
    loss, _ = reward_loss(t(2.0), t(1.0), normalizer=4)
    assert float(loss) == pytest.approx(nls(1.0) / 4, rel=1e-6)


def test_unknown_loss_and_missing_reference_are_errors():
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        preference_loss("kto", t(0.0), t(0.0), t(0.0), t(0.0))
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("sigmoid", t(0.0), t(0.0))


def test_config_choices_are_the_registry():
    from dataclasses import fields

    choices = next(f for f in fields(DPOConfig) if f.name == "loss_type").metadata["choices"]
    assert set(choices) == set(PREFERENCE_LOSSES)
