"""Advantage estimators checked against values worked out by hand here (plain Python and
math), never by calling the code under test."""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.advantages import (ADVANTAGE_ESTIMATORS, compute_advantages, gae, grpo,
                                     reinforce_pp, rloo, token_rewards)

pytestmark = pytest.mark.unit

F64 = torch.float64
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)  # ragged: second row has 2 tokens


def t(rows):
    return torch.tensor(rows, dtype=F64)


def close(x: torch.Tensor, rows, abs=1e-12):
    """x equals the nested list rows within abs (pytest.approx only takes flat lists)."""
    assert x.shape == (len(rows), len(rows[0]))
    assert x.flatten().tolist() == pytest.approx([v for row in rows for v in row], abs=abs)


def whiten(xs, eps=1e-8):
    """population mean/std whitening of a flat Python list."""
    mu = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))
    return [(x - mu) / (sd + eps) for x in xs]


def test_registry():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_pp"}
    with pytest.raises(KeyError, match="unknown advantage estimator"):
        compute_advantages("ppo", rewards=t([1.0]), mask=MASK[:1])


def test_token_rewards_by_hand():
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 1e30]])  # 1e30 is padding garbage
    r = token_rewards(t([1.0, 2.0]), MASK, kl=kl, kl_coef=0.5)
    expected = [[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]]
    close(r, expected)
    assert token_rewards(t([1.0, 2.0]), MASK).tolist() == [[0, 0, 1.0], [0, 2.0, 0]]


def test_gae_one_sequence_by_hand():
    gamma, lam = 0.9, 0.8
    r, v = [0.0, 0.0, 1.0], [0.5, 0.6, 0.7]
    d2 = 1.0 + gamma * 0.0 - 0.7          # 0.3  (V after the last token is 0)
    d1 = 0.0 + gamma * 0.7 - 0.6          # 0.03
    d0 = 0.0 + gamma * 0.6 - 0.5          # 0.04
    a2 = d2                               # 0.3
    a1 = d1 + gamma * lam * a2            # 0.03 + 0.72 * 0.3 = 0.246
    a0 = d0 + gamma * lam * a1            # 0.04 + 0.72 * 0.246 = 0.21712
    assert [a0, a1, a2] == pytest.approx([0.21712, 0.246, 0.3])
    adv, ret = gae(token_rewards=t([r]), values=t([v]), mask=t([[1, 1, 1]]), gamma=gamma, lam=lam)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7], abs=1e-12)

    # same sequence padded by two garbage tokens, next to a second sequence: unchanged
    adv_p, ret_p = gae(token_rewards=t([r + [1e30, -1e30], [0, 2.0, 0, 0, 0]]),
                       values=t([v + [1e30, 7.0], [1.0, 1.5, 1e30, 1e30, 1e30]]),
                       mask=t([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]), gamma=gamma, lam=lam)
    assert adv_p[0].tolist() == pytest.approx([a0, a1, a2, 0, 0], abs=1e-12)
    # second row: d1 = 2 - 1.5 = 0.5; d0 = 0.9*1.5 - 1 = 0.35, a0 = 0.35 + 0.72*0.5 = 0.71
    assert adv_p[1].tolist() == pytest.approx([0.71, 0.5, 0, 0, 0], abs=1e-12)
    assert ret_p[1].tolist() == pytest.approx([1.71, 2.0, 0, 0, 0], abs=1e-12)


def test_gae_gamma_lam_one_is_return_minus_value():
    adv, _ = gae(token_rewards=t([[0.0, 0.0, 1.0]]), values=t([[0.5, 0.6, 0.7]]),
                 mask=t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.4, 0.3], abs=1e-12)


def test_gae_whiten():
    adv, ret = gae(token_rewards=t([[0.0, 0.0, 1.0]]), values=t([[0.5, 0.6, 0.7]]),
                   mask=t([[1, 1, 1]]), gamma=0.9, lam=0.8, whiten=True)
    assert adv[0].tolist() == pytest.approx(whiten([0.21712, 0.246, 0.3]), abs=1e-9)
    assert ret[0].tolist() == pytest.approx([0.71712, 0.846, 1.0], abs=1e-12)  # not whitened


def test_grpo_by_hand():
    rewards = t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two groups of 3
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1], [0, 0], [1, 0]])
    # group 1: mean 2, sample std 1; group 2: mean 2, sample var (4+4+16)/2 = 12
    eps = 1e-6
    g1 = [-1 / (1 + eps), 0.0, 1 / (1 + eps)]
    g2 = [x / (math.sqrt(12) + eps) for x in (-2.0, -2.0, 4.0)]
    adv, ret = grpo(rewards=rewards, mask=mask, group_size=3, eps=eps)
    assert ret is None
    close(adv, [[a * m for m in row] for a, row in zip(g1 + g2, mask.tolist())])
    # Dr.GRPO: no division by the std
    adv, _ = grpo(rewards=rewards, mask=mask, group_size=3, scale_by_std=False)
    close(adv, [[a * m for m in row] for a, row in zip([-1, 0, 1, -2, -2, 4], mask.tolist())])


def test_grpo_equal_rewards_give_zero():
    adv, _ = grpo(rewards=t([0.5, 0.5, 0.5, 0.5]), mask=torch.ones(4, 3), group_size=4)
    assert adv.abs().max().item() == 0.0


def test_rloo_by_hand():
    rewards = t([1.0, 2.0, 3.0, 6.0])
    # baselines (12 - r_i) / 3 = 11/3, 10/3, 3, 2
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2]
    adv, ret = rloo(rewards=rewards, mask=torch.ones(4, 2, dtype=F64), group_size=4)
    assert ret is None
    assert adv[:, 0].tolist() == pytest.approx(expected, abs=1e-12)
    assert adv[:, 1].tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fn", [grpo, rloo])
def test_group_size_checked(fn):
    with pytest.raises(ValueError, match="group_size"):
        fn(rewards=t([1.0, 2.0, 3.0]), mask=torch.ones(3, 2), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        fn(rewards=t([1.0, 2.0]), mask=torch.ones(2, 2), group_size=1)


def test_reinforce_pp_by_hand():
    r = t([[-0.1, -0.1, 0.9], [0.0, 1.0, 1e30]])
    # gamma 1: returns G = [0.7, 0.8, 0.9] and [1.0, 1.0]; whitened over these 5 tokens
    w = whiten([0.7, 0.8, 0.9, 1.0, 1.0])
    # mean 0.88, population variance 0.068 / 5 = 0.0136
    assert w[0] == pytest.approx(-0.18 / math.sqrt(0.0136))
    adv, ret = reinforce_pp(token_rewards=r, mask=MASK)
    assert ret is None
    close(adv, [w[:3], w[3:] + [0.0]], abs=1e-9)
    # gamma 0.5: G = [-0.1 + 0.5*0.35, -0.1 + 0.5*0.9, 0.9] and [0.5, 1.0]
    w = whiten([0.075, 0.35, 0.9, 0.5, 1.0])
    adv, _ = reinforce_pp(token_rewards=r, mask=MASK, gamma=0.5)
    close(adv, [w[:3], w[3:] + [0.0]], abs=1e-9)


def test_reinforce_pp_with_kl_penalty_in_token_rewards():
    r = token_rewards(t([1.0]), t([[1, 1]]), kl=t([[0.2, 0.4]]), kl_coef=0.5)
    # r = [-0.1, -0.2 + 1] -> G = [0.7, 0.8] -> whitened [-1, 1] (std 0.05)
    adv, _ = reinforce_pp(token_rewards=r, mask=t([[1, 1]]))
    assert adv[0].tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo", "reinforce_pp"])
@pytest.mark.parametrize("garbage", [1e30, -1e30, math.inf, math.nan])
def test_padding_never_read(name, garbage):
    gen = torch.Generator().manual_seed(0)
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    pad = mask == 0
    rewards = torch.randn(4, generator=gen, dtype=F64)
    tok = token_rewards(rewards, mask, kl=torch.rand(4, 4, generator=gen, dtype=F64), kl_coef=0.1)
    values = torch.randn(4, 4, generator=gen, dtype=F64)
    kw = dict(rewards=rewards, group_size=2, gamma=0.9, lam=0.8, whiten=True)
    adv, ret = compute_advantages(name, token_rewards=tok, values=values, mask=mask, **kw)
    adv_g, ret_g = compute_advantages(name, token_rewards=tok.masked_fill(pad, garbage),
                                      values=values.masked_fill(pad, garbage), mask=mask, **kw)
    assert torch.equal(adv, adv_g) and adv[pad].abs().max().item() == 0.0
    assert (ret is None and ret_g is None) or torch.equal(ret, ret_g)
