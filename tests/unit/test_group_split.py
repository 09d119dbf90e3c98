"""actors.group.split_even: contiguous shards of near-equal size (no Ray started)."""
from __future__ import annotations

import pytest

from actors.group import split_even

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("length", [0, 1, 5, 7, 8, 16, 23])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_split_even(length, n):
    items = list(range(length))
    shards = split_even(items, n)
    assert len(shards) == n
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger shards come first
    assert [x for s in shards for x in s] == items  # order kept, nothing lost or repeated


def test_split_even_by_hand():
    assert split_even(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e"], ["f", "g"]]
    assert split_even([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]


def test_more_shards_than_items():
    assert split_even([1, 2], 4) == [[1], [2], [], []]
    assert split_even([], 3) == [[], [], []]
