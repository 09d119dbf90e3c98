"""The Bradley-Terry reward-model loss against hand-computed values.

Expected values are written out with math here, never by calling the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.rm_losses import bradley_terry_loss

pytestmark = pytest.mark.unit

R_CHOSEN = [2.0, -1.0, 0.5]
R_REJECTED = [0.5, 1.0, 0.5]   # diffs 1.5, -2.0, 0.0


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_loss_by_hand():
    # -log sigmoid(d) = log(1 + e^-d): d = 1.5, -2, 0
    expected = (softplus(-1.5) + softplus(2.0) + math.log(2)) / 3
    loss, _ = bradley_terry_loss(t(R_CHOSEN), t(R_REJECTED))
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_margin_is_subtracted_inside_the_sigmoid():
    margin = t([1.0, 0.0, -0.5])  # d - m = 0.5, -2, 0.5
    expected = (softplus(-0.5) + softplus(2.0) + softplus(-0.5)) / 3
    loss, _ = bradley_terry_loss(t(R_CHOSEN), t(R_REJECTED), margin)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_centering_term():
    # c * (r_c + r_r)^2 with c = 0.1: sums 2.5, 0.0, 1.0 -> 0.625, 0, 0.1
    bt = (softplus(-1.5) + softplus(2.0) + math.log(2)) / 3
    loss, _ = bradley_terry_loss(t(R_CHOSEN), t(R_REJECTED), center_coef=0.1)
    assert loss.item() == pytest.approx(bt + (0.625 + 0.0 + 0.1) / 3, abs=1e-12)


def test_stats_are_sums_by_hand():
    _, stats = bradley_terry_loss(t(R_CHOSEN), t(R_REJECTED))
    assert stats["accuracy"] == 1.5          # right, wrong, tie (half)
    assert stats["margin"] == pytest.approx(1.5 - 2.0 + 0.0)
    assert stats["rewards/chosen"] == pytest.approx(1.5)
    assert stats["rewards/rejected"] == pytest.approx(2.0)
    assert stats["rewards/sum"] == pytest.approx(3.5)
    assert stats["rewards/sq_sum"] == pytest.approx(4 + 1 + 0.25 + 0.25 + 1 + 0.25)


def test_gradient_pushes_chosen_up_and_rejected_down():
    rc, rr = t(R_CHOSEN).requires_grad_(True), t(R_REJECTED).requires_grad_(True)
    loss, _ = bradley_terry_loss(rc, rr)
    loss.backward()
    # d loss / d r_c = -(1 - sigmoid(d)) / n
    for d, g in zip([1.5, -2.0, 0.0], rc.grad.tolist()):
        assert g == pytest.approx(-(1 - 1 / (1 + math.exp(-d))) / 3, abs=1e-12)
    assert torch.allclose(rr.grad, -rc.grad)
