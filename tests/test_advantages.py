"""Advantage estimators (chatforge.rl.advantages) against plain-Python references, hand-computed
values, and the same numbers when the batch is split over two processes."""

import math
import random
import threading

import pytest
import torch

from chatforge.losses.reduce import count_units, masked_reduce
from chatforge.rl.advantages import ESTIMATORS, estimate, gae, leave_one_out, reward_to_go, whiten

# ---- plain-Python references -----------------------------------------------------------------------


def py_token_rewards(kl, score, n, kl_coef):
    r = [-kl_coef * kl[t] if t < n else 0.0 for t in range(len(kl))]
    r[n - 1] += score
    return r


def py_to_go(r, n, gamma):
    out, run = [0.0] * len(r), 0.0
    for t in reversed(range(n)):
        run = r[t] + gamma * run
        out[t] = run
    return out


def py_whiten(rows, lengths):
    vals = [v for row, n in zip(rows, lengths) for v in row[:n]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals) + 1e-8)
    return [[(v - mean) / std if t < n else 0.0 for t, v in enumerate(row)] for row, n in zip(rows, lengths)]


def py_shape(name, scores, k):
    out = []
    for g in range(0, len(scores), k):
        grp = scores[g : g + k]
        mean = sum(grp) / k
        std = math.sqrt(sum((s - mean) ** 2 for s in grp) / (k - 1))  # unbiased, as torch.std
        for s in grp:
            if name == "rloo":
                out.append(s - (sum(grp) - s) / (k - 1))
            elif name == "group_norm":
                out.append((s - mean) / (std + 1e-4))
            elif name == "reinforce_pp_baseline":
                out.append(s - mean)
            else:
                out.append(s)
    return out


def py_estimate(name, scores, kl, lengths, k, kl_coef, gamma):
    shaped = py_shape(name, scores, k)
    rets = [
        py_to_go(py_token_rewards(row, s, n, kl_coef), n, gamma) for row, s, n in zip(kl, shaped, lengths)
    ]
    return py_whiten(rets, lengths) if name.startswith("reinforce_pp") else rets


def batch(B=8, T=6, seed=0):
    rng = random.Random(seed)
    lengths = [rng.randint(1, T) for _ in range(B)]
    scores = [rng.choice([0.0, 1.0, 2.5, -1.0]) for _ in range(B)]
    kl = [[rng.uniform(-0.3, 0.5) for _ in range(T)] for _ in range(B)]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    return scores, kl, lengths, mask


CRITIC_FREE = ["group_norm", "rloo", "reinforce_pp", "reinforce_pp_baseline"]


@pytest.mark.parametrize("name", CRITIC_FREE)
@pytest.mark.parametrize("k,kl_coef,gamma", [(2, 0.0, 1.0), (4, 0.1, 1.0), (4, 0.05, 0.9)])
def test_critic_free_estimators_match_their_definitions(name, k, kl_coef, gamma):
    scores, kl, lengths, mask = batch()
    adv, ret = estimate(
        name, torch.tensor(scores), torch.tensor(kl), mask, kl_coef=kl_coef, group_size=k, gamma=gamma
    )
    want = py_estimate(name, scores, kl, lengths, k, kl_coef, gamma)
    torch.testing.assert_close(adv, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert not adv[mask == 0].any() and not ret[mask == 0].any()


def test_estimators_by_hand():
    # two prompts x two answers, one token each, no KL
    s, kl, m = torch.tensor([1.0, 0.0, 3.0, 1.0]), torch.zeros(4, 1), torch.ones(4, 1)
    assert estimate("rloo", s, kl, m, group_size=2)[0].flatten().tolist() == [1.0, -1.0, 2.0, -2.0]
    centred = estimate("reinforce_pp_baseline", s, kl, m, group_size=2)[0].flatten()
    # group-centred: 0.5, -0.5, 1, -1 -> mean 0, population std sqrt(0.625)
    want = torch.tensor([0.5, -0.5, 1.0, -1.0]) / math.sqrt(0.625)
    torch.testing.assert_close(centred, want, rtol=1e-5, atol=1e-6)
    gn = estimate("group_norm", s, kl, m, group_size=2)[0].flatten()
    std = [math.sqrt(0.5), math.sqrt(2.0)]  # unbiased std of (1, 0) and (3, 1)
    want = [0.5 / (std[0] + 1e-4), -0.5 / (std[0] + 1e-4), 1 / (std[1] + 1e-4), -1 / (std[1] + 1e-4)]
    assert gn.tolist() == pytest.approx(want, rel=1e-5)
    # REINFORCE++: KL enters the reward per token; reward-to-go, then whitened over the batch
    kl2, m2 = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    _, ret = estimate("reinforce_pp", torch.tensor([1.0, 0.0]), kl2, m2, kl_coef=0.5)
    # row 0: r = (-0.5, -1 + 1) -> to-go (-0.5, 0); row 1: r = (0,) -> (0,)
    assert ret.tolist() == [[-0.5, 0.0], [0.0, 0.0]]


def test_gae_estimator_is_the_classic_path():
    scores, kl, lengths, mask = batch()
    values = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)) * mask
    s, k = torch.tensor(scores), torch.tensor(kl) * mask
    rewards = torch.zeros(8, 6)
    for i, n in enumerate(lengths):
        rewards[i] = torch.tensor(py_token_rewards(kl[i], scores[i], n, 0.1))
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    got_adv, got_ret = estimate("gae", s, k, mask, values, kl_coef=0.1, lam=0.95)
    torch.testing.assert_close(got_adv, whiten(adv, mask))
    torch.testing.assert_close(got_ret, ret)
    raw, _ = estimate("gae", s, k, mask, values, kl_coef=0.1, whiten_advantages=False)
    torch.testing.assert_close(raw, adv)


def test_reward_to_go_and_leave_one_out_by_hand():
    assert reward_to_go(torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3), 0.5).tolist() == [[1.75, 1.5, 1.0]]
    assert leave_one_out(torch.tensor([2.0, 4.0, 0.0, 0.0]), 2).tolist() == [-2.0, 2.0, 0.0, 0.0]


def test_bad_groups_and_missing_values_are_refused():
    s, kl, m = torch.zeros(4), torch.zeros(4, 2), torch.ones(4, 2)
    with pytest.raises(ValueError, match="at least 2 answers per prompt"):
        estimate("rloo", s, kl, m, group_size=1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        estimate("group_norm", s, kl, m, group_size=3)
    with pytest.raises(ValueError, match="needs the critic's values"):
        estimate("gae", s, kl, m)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        estimate("vtrace", s, kl, m)
    assert {n for n, e in ESTIMATORS.items() if e.critic} == {"gae"}


class TwoProcesses:
    """Two threads standing in for two data-parallel processes: `all_sum` adds both ranks' tensors."""

    def __init__(self):
        self.barrier, self.slots = threading.Barrier(2), [None, None]

    def all_sum(self, rank):
        def reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = self.slots[0] + self.slots[1]
            self.barrier.wait()  # both have read before either writes the next one
            return out

        return reduce


@pytest.mark.parametrize("name", ["gae", *CRITIC_FREE])
def test_two_processes_give_the_estimate_of_the_global_batch(name):
    scores, kl, lengths, mask = batch(B=8)
    s, k = torch.tensor(scores), torch.tensor(kl)
    values = torch.randn(8, 6, generator=torch.Generator().manual_seed(2)) * mask
    args = {"kl_coef": 0.1, "group_size": 2}
    want = estimate(name, s, k, mask, values, **args)[0]
    world, out = TwoProcesses(), [None, None]

    def run(rank):
        rows = slice(4 * rank, 4 * rank + 4)  # whole groups per process, as PPO samples them
        out[rank] = estimate(
            name, s[rows], k[rows], mask[rows], values[rows], all_sum=world.all_sum(rank), **args
        )[0]

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(out), want, rtol=1e-5, atol=1e-6)
    if name in ("gae", "reinforce_pp", "reinforce_pp_baseline"):  # global, not per-process, whitening
        local = torch.cat(
            [estimate(name, s[r], k[r], mask[r], values[r], **args)[0] for r in (slice(0, 4), slice(4, 8))]
        )
        assert not torch.allclose(local, want)


def test_dr_grpo_constant_normaliser_by_hand_and_under_accumulation():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # sum 6 over 2 answers x a generation limit of 4 tokens, whatever the answers' lengths
    total = count_units(m, "constant", length=4)
    assert total == 8 and float(masked_reduce(x, m, "constant", total)) == pytest.approx(6 / 8)
    parts = [masked_reduce(x[i : i + 1], m[i : i + 1], "constant", total) for i in range(2)]
    assert sum(count_units(m[i : i + 1], "constant", 4) for i in range(2)) == total
    assert float(sum(parts)) == pytest.approx(6 / 8)
    # token mean (DAPO) and sequence mean differ on the same numbers
    assert float(masked_reduce(x, m, "token")) == pytest.approx(6 / 3)
    assert float(masked_reduce(x, m, "sequence")) == pytest.approx((1.5 + 3) / 2)
