"""Preference losses checked against hand-computed values of their formulas.

h = (pi_c - pi_r) - (ref_c - ref_r); expected values are written out with math here, never
by calling the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.dpo_losses import DPO_LOSSES, preference_loss

pytestmark = pytest.mark.unit

# three pairs: (pi_c, pi_r, ref_c, ref_r)
PAIRS = [
    (-10.0, -14.0, -11.0, -12.0),  # h = 4 - 1 = 3
    (-20.0, -18.0, -19.0, -19.5),  # h = -2 - 0.5 = -2.5
    (-5.0, -5.0, -5.0, -5.0),      # h = 0 (policy == reference, a tie)
]
H = [3.0, -2.5, 0.0]
BETA = 0.5


def tensors(pairs=PAIRS):
    cols = list(zip(*pairs))
    return [torch.tensor(c, dtype=torch.float64) for c in cols]


def log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


def mean(xs):
    return sum(xs) / len(xs)


def test_all_losses_registered():
    assert set(DPO_LOSSES) == {"sigmoid", "cdpo", "ipo", "hinge"}


def test_h_values_of_the_fixture():
    for (pc, pr, rc, rr), h in zip(PAIRS, H):
        assert (pc - pr) - (rc - rr) == h


def test_sigmoid_by_hand():
    # -log sigma(0.5*3) = log(1 + e^-1.5); -log sigma(-1.25) = log(1 + e^1.25); tie: log 2
    per_pair = [math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(1.25)), math.log(2)]
    loss, _ = preference_loss("sigmoid", *tensors(), beta=BETA)
    assert loss.item() == pytest.approx(mean(per_pair), abs=1e-12)
    direct = DPO_LOSSES["sigmoid"](torch.tensor(H, dtype=torch.float64), BETA)
    assert direct.tolist() == pytest.approx(per_pair, abs=1e-12)


def test_sigmoid_is_log2_when_policy_equals_reference():
    pc, pr = torch.tensor([-3.0, -40.0]), torch.tensor([-7.0, -2.0])
    for beta in (0.01, 0.1, 1.0):
        loss, stats = preference_loss("sigmoid", pc, pr, pc.clone(), pr.clone(), beta=beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert stats["rewards/chosen"] == 0 and stats["rewards/rejected"] == 0
        assert stats["rewards/accuracy"] == 1.0  # two ties, half each


def test_cdpo_by_hand():
    eps = 0.2
    per_pair = [-(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h) for h in H]
    # written out for the first pair: 0.8*log(1+e^-1.5) + 0.2*log(1+e^1.5)
    assert per_pair[0] == pytest.approx(0.8 * math.log(1 + math.exp(-1.5))
                                        + 0.2 * math.log(1 + math.exp(1.5)))
    loss, _ = preference_loss("cdpo", *tensors(), beta=BETA, label_smoothing=eps)
    assert loss.item() == pytest.approx(mean(per_pair), abs=1e-12)


def test_cdpo_without_smoothing_is_sigmoid():
    a, _ = preference_loss("cdpo", *tensors(), beta=BETA, label_smoothing=0.0)
    b, _ = preference_loss("sigmoid", *tensors(), beta=BETA)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_ipo_by_hand():
    # 1/(2*0.5) = 1: (3-1)^2 = 4, (-2.5-1)^2 = 12.25, (0-1)^2 = 1
    loss, _ = preference_loss("ipo", *tensors(), beta=BETA)
    assert loss.item() == pytest.approx((4 + 12.25 + 1) / 3, abs=1e-12)
    beta = 0.1  # 1/(2*0.1) = 5
    loss, _ = preference_loss("ipo", *tensors(), beta=beta)
    assert loss.item() == pytest.approx(((3 - 5) ** 2 + (-2.5 - 5) ** 2 + (0 - 5) ** 2) / 3,
                                        abs=1e-9)


def test_hinge_by_hand():
    # max(0, 1 - 0.5*3) = 0, max(0, 1 + 1.25) = 2.25, max(0, 1 - 0) = 1
    loss, _ = preference_loss("hinge", *tensors(), beta=BETA)
    assert loss.item() == pytest.approx((0 + 2.25 + 1) / 3, abs=1e-12)
    # margin exactly 1 gives zero loss
    loss, _ = preference_loss("hinge", *tensors([(-1.0, -3.0, -1.0, -1.0)]), beta=BETA)
    assert loss.item() == 0.0


def test_nll_term():
    pc, pr, rc, rr = tensors()
    tokens = torch.tensor([4, 10, 1])
    w = 0.3
    sig = [math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(1.25)), math.log(2)]
    nll = [10.0 / 4, 20.0 / 10, 5.0 / 1]  # -pi_c / |y_c|
    expected = mean([s + w * n for s, n in zip(sig, nll)])
    loss, _ = preference_loss("sigmoid", pc, pr, rc, rr, beta=BETA, nll_weight=w,
                              chosen_tokens=tokens)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_nll_term_with_ipo():
    pc, pr, rc, rr = tensors()
    tokens = torch.tensor([5, 5, 5])
    loss, _ = preference_loss("ipo", pc, pr, rc, rr, beta=BETA, nll_weight=1.0,
                              chosen_tokens=tokens)
    expected = mean([4 + 10 / 5, 12.25 + 20 / 5, 1 + 5 / 5])
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_stats_by_hand():
    _, stats = preference_loss("sigmoid", *tensors(), beta=BETA)
    # rewards: beta * (pi - ref)
    r_c = [0.5 * (-10 + 11), 0.5 * (-20 + 19), 0.5 * (-5 + 5)]    # 0.5, -0.5, 0
    r_r = [0.5 * (-14 + 12), 0.5 * (-18 + 19.5), 0.5 * (-5 + 5)]  # -1, 0.75, 0
    assert stats["rewards/chosen"] == pytest.approx(sum(r_c))
    assert stats["rewards/rejected"] == pytest.approx(sum(r_r))
    assert stats["rewards/margin"] == pytest.approx(sum(r_c) - sum(r_r))
    # pair 1 right, pair 2 wrong, pair 3 a tie: 1 + 0 + 0.5
    assert stats["rewards/accuracy"] == pytest.approx(1.5)
    assert stats["logps/chosen"] == pytest.approx(-35.0)
    assert stats["logps/rejected"] == pytest.approx(-37.0)
    assert all(isinstance(v, float) for v in stats.values())


def test_stats_same_for_every_loss():
    ref = preference_loss("sigmoid", *tensors(), beta=BETA)[1]
    ref.pop("loss")
    for name in DPO_LOSSES:
        loss, stats = preference_loss(name, *tensors(), beta=BETA, label_smoothing=0.1)
        assert stats.pop("loss") == pytest.approx(loss.item() * 3)
        assert stats == ref


def test_weights_scale_pairs_and_zero_weight_pairs_leave_the_stats():
    """Online DPO pads a step with weight-0 copies: they add nothing to the loss or its
    gradient, and the statistics count only the weighted pairs."""
    pc, pr, rc, rr = (t.requires_grad_(i < 2) for i, t in enumerate(tensors()))
    w = torch.tensor([1.5, 1.5, 0.0])
    loss, stats = preference_loss("sigmoid", pc, pr, rc, rr, beta=BETA, weights=w)
    per = -torch.nn.functional.logsigmoid(BETA * ((pc - pr) - (rc - rr))).detach()
    assert loss.item() == pytest.approx((1.5 * per[0] + 1.5 * per[1]).item() / 3)
    assert stats["loss"] == pytest.approx((per[0] + per[1]).item())
    only_two = preference_loss("sigmoid", pc[:2], pr[:2], rc[:2], rr[:2], beta=BETA)[1]
    assert stats == pytest.approx(only_two)
    loss.backward()
    assert pc.grad[2].item() == 0.0 and pr.grad[2].item() == 0.0


def _grads(name, **kw):
    pc, pr, rc, rr = tensors()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, _ = preference_loss(name, pc, pr, rc, rr, beta=BETA, **kw)
    loss.backward()
    return pc.grad, pr.grad


def test_sigmoid_gradient_signs_and_values():
    gc, gr = _grads("sigmoid")
    assert (gc < 0).all() and (gr > 0).all()
    # d/d pi_c of mean(-log sigma(beta h)) = -beta * (1 - sigma(beta h)) / n
    expected = [-BETA * (1 - 1 / (1 + math.exp(-BETA * h))) / 3 for h in H]
    assert gc.tolist() == pytest.approx(expected, abs=1e-12)
    assert gr.tolist() == pytest.approx([-g for g in expected], abs=1e-12)


@pytest.mark.parametrize("name", ["cdpo", "ipo"])
def test_other_losses_push_chosen_up_where_not_saturated(name):
    kw = {"label_smoothing": 0.1} if name == "cdpo" else {}
    gc, gr = _grads(name, **kw)
    # pair 2 has h < 0: every loss wants pi_c up and pi_r down there
    assert gc[1] < 0 and gr[1] > 0


def test_hinge_gradient_zero_past_margin():
    gc, gr = _grads("hinge")
    assert gc[0] == 0 and gr[0] == 0          # beta*h = 1.5 >= 1
    assert gc[1] == pytest.approx(-BETA / 3)  # active
    assert gr[1] == pytest.approx(BETA / 3)


def test_ipo_averaged_log_ratios_by_hand():
    # per-token log-ratios: chosen (pi_c - ref_c) / n_c, rejected (pi_r - ref_r) / n_r
    # pair 1: (1 / 2) - (-2 / 4) = 1.0; pair 2: (-1 / 1) - (1.5 / 3) = -1.5; pair 3: 0 - 0 = 0
    pc, pr, rc, rr = tensors()
    n_c, n_r = torch.tensor([2, 1, 5]), torch.tensor([4, 3, 5])
    h = [1.0, -1.5, 0.0]
    loss, _ = preference_loss("ipo", pc, pr, rc, rr, beta=BETA, chosen_tokens=n_c,
                              rejected_tokens=n_r, average_logratios=True)
    assert loss.item() == pytest.approx(mean([(x - 1.0) ** 2 for x in h]), abs=1e-12)
    # the summed form (IPO's formula taken literally) gives the fixture's h instead
    summed, _ = preference_loss("ipo", pc, pr, rc, rr, beta=BETA, chosen_tokens=n_c,
                                rejected_tokens=n_r)
    assert summed.item() == pytest.approx(mean([(x - 1.0) ** 2 for x in H]), abs=1e-12)


def test_averaged_log_ratios_need_both_lengths():
    with pytest.raises(ValueError, match="rejected_tokens"):
        preference_loss("ipo", *tensors(), beta=BETA, chosen_tokens=torch.tensor([1, 1, 1]),
                        average_logratios=True)
