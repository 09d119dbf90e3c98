"""KL estimators checked against values worked out by hand here (math), never by calling
the code under test."""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.kl import KL_ESTIMATORS, kl_per_token

pytestmark = pytest.mark.unit

F64 = torch.float64
LOGP = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
REF = torch.tensor([-1.5, -1.0, -0.5], dtype=F64)  # r = logp - ref = [0.5, -1.0, 0.0]


def test_registry():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(KeyError, match="unknown KL estimator"):
        kl_per_token("k4", LOGP, REF, torch.ones(3))


def test_k1_by_hand():
    assert KL_ESTIMATORS["k1"](LOGP, REF).tolist() == [0.5, -1.0, 0.0]


def test_k2_by_hand():
    assert KL_ESTIMATORS["k2"](LOGP, REF).tolist() == pytest.approx([0.125, 0.5, 0.0])


def test_k3_by_hand():
    # exp(-0.5) - 1 + 0.5, exp(1) - 1 - 1, exp(0) - 1 + 0
    expected = [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]
    assert KL_ESTIMATORS["k3"](LOGP, REF).tolist() == pytest.approx(expected, abs=1e-12)


def test_k3_non_negative_and_zero_at_zero():
    r = torch.linspace(-20, 20, 4001, dtype=F64)
    assert KL_ESTIMATORS["k3"](r, torch.zeros_like(r)).min().item() >= 0.0
    same = torch.tensor([-3.0, -0.1, 0.0])
    assert KL_ESTIMATORS["k3"](same, same.clone()).tolist() == [0.0, 0.0, 0.0]


def test_k1_and_k3_unbiased_over_a_categorical():
    # tokens drawn from pi: E_pi[k] is the exact expectation over the three outcomes
    pi, ref = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    kl = sum(p * math.log(p / q) for p, q in zip(pi, ref))  # 0.5 ln 2.5 + 0.2 ln 0.4
    assert kl == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(0.4))
    logp = torch.tensor(pi, dtype=F64).log()
    logq = torch.tensor(ref, dtype=F64).log()
    w = torch.tensor(pi, dtype=F64)
    for name in ("k1", "k3"):
        assert (w * KL_ESTIMATORS[name](logp, logq)).sum().item() == pytest.approx(kl, abs=1e-12)
    # k2 is biased: 0.5 E[r^2] differs from KL here
    e_k2 = 0.5 * sum(p * math.log(p / q) ** 2 for p, q in zip(pi, ref))
    assert (w * KL_ESTIMATORS["k2"](logp, logq)).sum().item() == pytest.approx(e_k2, abs=1e-12)
    assert e_k2 != pytest.approx(kl, abs=1e-3)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
@pytest.mark.parametrize("garbage", [1e30, -1e30, math.inf, math.nan])
def test_padding_never_read(name, garbage):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.7, -3.0, -2.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    clean = kl_per_token(name, logp, ref, mask)
    dirty = kl_per_token(name, logp.masked_fill(~mask, garbage), ref.masked_fill(~mask, -garbage),
                         mask)
    assert torch.equal(clean, dirty)
    assert clean[1, 1:].tolist() == [0.0, 0.0]
    assert torch.equal(clean[0], KL_ESTIMATORS[name](logp[0], ref[0]))
