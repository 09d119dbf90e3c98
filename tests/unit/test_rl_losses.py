"""RL losses checked against values worked out by hand here (plain Python and math), never
by calling the code under test."""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.rl_losses import (AGGREGATIONS, POLICY_LOSSES, aggregate, entropy_loss,
                                    explained_variance, kl_loss, policy_loss, ppo_loss,
                                    truncated_is_weights, value_loss)

pytestmark = pytest.mark.unit

F64 = torch.float64
GARBAGE = 1e30


def t(rows):
    return torch.tensor(rows, dtype=F64)


# ragged batch: 3, 2 and 1 real tokens
MASK = t([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
LOSS = t([[1.0, 2.0, 3.0], [4.0, 5.0, GARBAGE], [6.0, GARBAGE, -GARBAGE]])

# PPO tokens, eps_low = 0.2, eps_high = 0.28: (ratio, advantage, per-token loss, clipped?)
PPO_TOKENS = [
    (1.25, 1.0, -1.25, False),   # inside [0.8, 1.28] (outside the symmetric 1.2)
    (1.5, 1.0, -1.28, True),     # max(-1.5, -1.28): clipped at 1 + eps_high
    (1.5, -1.0, 1.5, False),     # max(1.5, 1.28): unclipped is the pessimistic one
    (0.5, -1.0, 0.8, True),      # max(0.5, 0.8): clipped at 1 - eps_low
    (0.5, 1.0, -0.5, False),     # max(-0.5, -0.8): unclipped
    (0.9, -2.0, 1.8, False),     # inside
]


def ppo_inputs(tokens=PPO_TOKENS, old=-1.0):
    ratio = t([[r for r, *_ in tokens]])
    old_logp = torch.full_like(ratio, old)
    adv = t([[a for _, a, *_ in tokens]])
    return old_logp + ratio.log(), old_logp, adv, torch.ones_like(ratio)


def test_registries():
    assert set(AGGREGATIONS) == {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum"}
    assert set(POLICY_LOSSES) == {"ppo"}
    with pytest.raises(KeyError, match="unknown aggregation"):
        aggregate(LOSS, MASK, "sum")
    with pytest.raises(KeyError, match="unknown policy loss"):
        policy_loss("grpo", *ppo_inputs())


def test_aggregations_on_ragged_mask():
    assert aggregate(LOSS, MASK, "token_mean").item() == pytest.approx(21 / 6)
    # per-sequence token means 2, 4.5, 6
    assert aggregate(LOSS, MASK, "seq_mean_token_mean").item() == pytest.approx((2 + 4.5 + 6) / 3)
    # per-sequence sums 6, 9, 6
    assert aggregate(LOSS, MASK, "seq_mean_token_sum").item() == pytest.approx(7.0)


def test_ppo_clip_by_hand():
    loss, stats = ppo_loss(*ppo_inputs(), eps_low=0.2, eps_high=0.28)
    per_token = [l for *_, l, _ in PPO_TOKENS]
    assert loss.item() == pytest.approx(sum(per_token) / 6, abs=1e-12)   # 1.07 / 6
    assert sum(per_token) == pytest.approx(1.07)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["dual_clip_frac"] == 0.0
    ratios = [r for r, *_ in PPO_TOKENS]
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / 6, abs=1e-12)
    assert stats["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 6)


def test_ppo_symmetric_clip_differs():
    # eps_high defaults to eps_low: the first token (ratio 1.25, A = 1) is now clipped at 1.2
    loss, stats = ppo_loss(*ppo_inputs(PPO_TOKENS[:1]), eps_low=0.2)
    assert loss.item() == pytest.approx(-1.2, abs=1e-12)
    assert stats["clip_frac"] == 1.0


def test_ppo_gradient_zero_on_clipped_tokens():
    logp, old, adv, mask = ppo_inputs()
    logp.requires_grad_(True)
    ppo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)[0].backward()
    # d(-A rho)/d logp = -A rho / N on unclipped tokens; 0 where the clipped term is chosen
    expected = [0.0 if c else -a * r / 6 for r, a, _, c in PPO_TOKENS]
    assert logp.grad[0].tolist() == pytest.approx(expected, abs=1e-12)


def test_ppo_dual_clip():
    tokens = [(5.0, -1.0), (2.0, -1.0), (5.0, 1.0)]
    logp, old, adv, mask = ppo_inputs([(r, a, None, None) for r, a in tokens])
    loss, stats = ppo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    # max(5, 1.28) = 5 capped at 3*|-1| = 3; max(2, 1.28) = 2 < 3; A > 0: max(-5, -1.28)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.28) / 3, abs=1e-12)
    assert stats["dual_clip_frac"] == pytest.approx(1 / 3)
    assert stats["clip_frac"] == pytest.approx(1 / 3)  # only the A > 0 token
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_loss(logp, old, adv, mask, dual_clip=1.0)


def test_truncated_is_weights_and_ppo():
    old = t([[-1.0, -1.0, -1.0]])
    rollout = t([[-1.5, -2.0, -0.7]])  # old - rollout = 0.5, 1.0, -0.3
    w = truncated_is_weights(old, rollout, torch.ones(1, 3), cap=2.0)
    assert w[0].tolist() == pytest.approx([math.exp(0.5), 2.0, math.exp(-0.3)], abs=1e-12)
    adv = t([[1.0, -1.0, 2.0]])
    loss, _ = ppo_loss(old.clone(), old, adv, torch.ones(1, 3), is_weights=w)  # ratio 1
    assert loss.item() == pytest.approx((-math.exp(0.5) + 2.0 - 2 * math.exp(-0.3)) / 3)


def test_ppo_aggregations_on_ragged_mask():
    # per-token losses -A at ratio 1: rows [-1, -2, -3], [-4, -5], [-6]
    old = t([[-1.0] * 3] * 3)
    adv = LOSS.clone()
    for agg, expected in [("token_mean", -21 / 6), ("seq_mean_token_mean", -12.5 / 3),
                          ("seq_mean_token_sum", -7.0)]:
        loss, _ = ppo_loss(old.clone(), old, adv, MASK, agg=agg)
        assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_entropy_and_kl_terms():
    ent = t([[1.0, 2.0], [3.0, GARBAGE]])
    mask = t([[1, 1], [1, 0]])
    assert entropy_loss(ent, mask, 0.01).item() == pytest.approx(-0.01 * 2.0)
    assert entropy_loss(ent, mask, 0.01, "seq_mean_token_sum").item() == pytest.approx(-0.01 * 3)
    logp, ref = t([[-1.0, -2.0], [-0.5, GARBAGE]]), t([[-1.5, -1.0], [-0.5, -GARBAGE]])
    # k1 = [0.5, -1, 0]; k3 = [e^-0.5 - 0.5, e - 2, 0]
    assert kl_loss(logp, ref, mask, 0.1, "k1").item() == pytest.approx(0.1 * -0.5 / 3)
    k3 = (math.exp(-0.5) - 0.5 + math.e - 2.0) / 3
    assert kl_loss(logp, ref, mask, 0.1).item() == pytest.approx(0.1 * k3, abs=1e-12)


def test_value_loss_clipping_by_hand():
    v, old, ret = t([[1.0, 1.0, 0.6]]), t([[0.5, 0.5, 0.5]]), t([[1.2, 0.0, 2.0]])
    # token 0: v_clip = 0.7: max(0.04, 0.25) = 0.25 (clipped term)
    # token 1: v_clip = 0.7: max(1.0, 0.49) = 1.0
    # token 2: inside the clip range: 1.96 both
    loss, stats = value_loss(v, old, ret, torch.ones(1, 3), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0 + 1.96) / 3, abs=1e-12)
    assert stats["vf_clip_frac"] == pytest.approx(1 / 3)
    loss, stats = value_loss(v, old, ret, torch.ones(1, 3), clip=None)
    assert loss.item() == pytest.approx(0.5 * (0.04 + 1.0 + 1.96) / 3, abs=1e-12)
    assert stats["vf_clip_frac"] == 0.0


def test_explained_variance():
    ret = t([[1.0, 2.0, 3.0], [4.0, GARBAGE, GARBAGE]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    assert explained_variance(ret.masked_fill(mask == 0, -GARBAGE), ret, mask) == 1.0
    # constant prediction at the mean: 0
    assert explained_variance(torch.full_like(ret, 2.5), ret, mask) == pytest.approx(0.0)
    # R = [1, 2, 3], V = [1, 2, 2]: Var(R - V) = 2/9, Var(R) = 2/3 -> 1 - 1/3
    one = torch.ones(1, 3)
    assert explained_variance(t([[1.0, 2.0, 2.0]]), ret[:1], one) == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(ret[:1], torch.ones(1, 3, dtype=F64), one))


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("garbage", [GARBAGE, -GARBAGE, math.inf, math.nan])
def test_padding_never_read(agg, garbage):
    gen = torch.Generator().manual_seed(0)
    pad = MASK == 0

    def rand():
        return torch.randn(3, 3, generator=gen, dtype=F64)

    logp, old, adv, rollout, v, old_v, ret, ent = (rand() for _ in range(8))

    def dirty(x):
        return x.masked_fill(pad, garbage).requires_grad_(True)

    def run(f):
        lp = f(logp)
        w = truncated_is_weights(f(old), f(rollout), MASK)
        pl, ps = ppo_loss(lp, f(old), f(adv), MASK, agg=agg, eps_high=0.3, dual_clip=3.0,
                          is_weights=w)
        vl, vs = value_loss(f(v), f(old_v), f(ret), MASK, agg=agg)
        extra = entropy_loss(f(ent), MASK, 0.01, agg) + kl_loss(lp, f(old), MASK, 0.1, agg=agg)
        total = pl + vl + extra
        total.backward()
        return total.item(), ps, vs, explained_variance(f(v), f(ret), MASK), lp.grad

    clean = run(lambda x: x.clone().requires_grad_(True))
    noisy = run(dirty)
    assert clean[:4] == noisy[:4]
    assert torch.equal(clean[4], noisy[4]) and noisy[4][pad].abs().max().item() == 0.0
