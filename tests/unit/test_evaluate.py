"""Rank correlation used for reward models against a gold reward: ranks and Spearman by hand."""
from __future__ import annotations

import pytest

from orchestrator.evaluate import ranks, spearman

pytestmark = pytest.mark.unit


def test_ranks_average_ties():
    assert ranks([10.0, 30.0, 20.0]) == [1.0, 3.0, 2.0]
    assert ranks([5.0, 1.0, 5.0, 3.0]) == [3.5, 1.0, 3.5, 2.0]
    assert ranks([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    # ranks a = 1 2 3 4, b = 2 1 4 3: d^2 sums to 4, rho = 1 - 6*4 / (4*15) = 0.6
    assert spearman([1, 2, 3, 4], [5, 1, 9, 7]) == pytest.approx(0.6)
    # monotone transforms do not change it
    assert spearman([0.1, 0.5, 0.2], [1e3, 1e9, 1e4]) == pytest.approx(1.0)


def test_spearman_with_ties_is_pearson_of_average_ranks():
    # a ranks 1.5 1.5 3 4, b ranks 1 2 3 4: means 2.5; cov = 1.5+0.5+0.5+2.25 ... by hand:
    # da = -1 -1 0.5 1.5, db = -1.5 -0.5 0.5 1.5: sum da*db = 1.5 + 0.5 + 0.25 + 2.25 = 4.5
    # sum da^2 = 1 + 1 + 0.25 + 2.25 = 4.5, sum db^2 = 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


def test_constant_side_gives_zero():
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
