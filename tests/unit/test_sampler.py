"""ResumableSampler: seeded, epoch-wise permutations, exact resume from state."""
from __future__ import annotations

import pytest

from orchestrator.sampler import ResumableSampler

pytestmark = pytest.mark.unit


def draw(sampler: ResumableSampler, batches: int, n: int) -> list[list[int]]:
    return [sampler.next_batch(n) for _ in range(batches)]


def test_same_seed_same_sequence():
    assert draw(ResumableSampler(50, seed=3), 12, 7) == draw(ResumableSampler(50, seed=3), 12, 7)


def test_different_seed_different_sequence():
    assert draw(ResumableSampler(50, seed=3), 3, 10) != draw(ResumableSampler(50, seed=4), 3, 10)


def test_each_epoch_is_a_permutation():
    size = 37
    s = ResumableSampler(size, seed=11)
    flat = s.next_batch(size * 4)
    epochs = [flat[i * size:(i + 1) * size] for i in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(size))
    # shuffled, and shuffled differently each epoch
    assert epochs[0] != list(range(size))
    assert len({tuple(e) for e in epochs}) == 4


def test_batches_cross_epoch_boundaries():
    size = 10
    s = ResumableSampler(size, seed=0)
    batches = draw(s, 5, 4)  # 20 indices: two full epochs, boundaries inside batches
    assert all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10))
    assert sorted(flat[10:]) == list(range(10))
    assert s.epoch == 1 and s.position == 10
    nxt = s.next_batch(3)
    assert s.epoch == 2 and s.position == 3
    assert nxt == ResumableSampler(size, seed=0).next_batch(23)[20:]


def test_batch_larger_than_dataset():
    s = ResumableSampler(3, seed=5)
    batch = s.next_batch(8)
    assert len(batch) == 8
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]


def test_no_shuffle_is_in_order():
    s = ResumableSampler(4, seed=9, shuffle=False)
    assert s.next_batch(6) == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("k", [0, 1, 3, 5, 7, 12])
def test_restore_after_k_batches(k):
    size, n = 23, 5
    original = ResumableSampler(size, seed=42)
    draw(original, k, n)
    state = original.state_dict()
    restored = ResumableSampler(size, seed=42)
    restored.load_state_dict(dict(state))
    assert draw(restored, 10, n) == draw(original, 10, n)


def test_restore_at_exact_epoch_end():
    size = 12
    original = ResumableSampler(size, seed=1)
    original.next_batch(size)  # position == size, epoch not advanced yet
    restored = ResumableSampler(size, seed=1)
    restored.load_state_dict(original.state_dict())
    assert restored.next_batch(30) == original.next_batch(30)


def test_state_dict_is_plain_and_json_safe():
    import json

    s = ResumableSampler(9, seed=2)
    s.next_batch(13)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state == {"size": 9, "seed": 2, "epoch": 1,
                                                      "position": 4}


def test_load_state_with_mismatched_size_raises():
    state = ResumableSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError, match="10 rows"):
        ResumableSampler(11, seed=0).load_state_dict(state)


def test_load_state_with_mismatched_seed_raises():
    state = ResumableSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError):
        ResumableSampler(10, seed=1).load_state_dict(state)


def test_empty_dataset_rejected():
    with pytest.raises(ValueError):
        ResumableSampler(0, seed=0)
