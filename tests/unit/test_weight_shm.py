"""Weight sync through shared memory (actors/weight_shm.py): a trainer and two engines of one
group on this machine agree on it, buckets larger than a slot go through in chunks, syncs
repeat on the same slots, nothing is left in /dev/shm; an engine that cannot map the file
gets the same chunks over the socket while the other reads shared memory; a group whose
trainer turns it off, or where no engine can map it, broadcasts over gloo; every engine ends
up with the trainer's tensors in each case."""
from __future__ import annotations

import socket
import threading

import pytest
import torch

from actors import weight_shm
from actors.weight_sync import (SyncTally, UpdateInfo, _nbytes, open_group, plan_buckets,
                                receive_buckets, send_weights)

pytestmark = pytest.mark.unit

SHAPES = [[300, 40], [7], [2000, 3], [64, 64], [5, 5, 5]]   # the third exceeds a slot


def _info(tensors: dict, bucket_bytes: int) -> UpdateInfo:
    names = list(tensors)
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors.values()]
    shapes = [list(t.shape) for t in tensors.values()]
    sizes = [_nbytes(d, s) for d, s in zip(dtypes, shapes)]
    return UpdateInfo(names, dtypes, shapes, plan_buckets(sizes, bucket_bytes))


def _run_group(syncs: list[dict], shared_memory: bool, receivers: int = 2):
    """Open a 1 + ``receivers`` group in threads and run each sync of ``syncs``; returns the
    group transports by rank and what each receiver got, sync by sync."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transports, got, errors = {}, {r: [] for r in range(1, receivers + 1)}, []
    world = receivers + 1

    def member(rank: int):
        try:
            group = open_group("127.0.0.1", port, rank, world, timeout_s=30,
                               shared_memory=shared_memory)
            transports[rank] = group.transport
            for tensors in syncs:
                info = _info(tensors, bucket_bytes=8 << 10)
                if rank == 0:
                    stats = send_weights(iter(tensors.items()), info, group)
                    assert stats["transport"] == group.transport
                else:
                    received = {}
                    for batch in receive_buckets(group, info, SyncTally(None)):
                        received.update({n: t.clone() for n, t in batch})
                    got[rank].append(received)
        except Exception as exc:  # noqa: BLE001  (reported by the test)
            errors.append((rank, exc))

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return transports, got


def _syncs(n: int) -> list[dict]:
    torch.manual_seed(0)
    return [{f"p{i}": torch.randn(shape) for i, shape in enumerate(SHAPES)} for _ in range(n)]


def _leftovers() -> set:
    return {p.name for p in weight_shm.SHM_DIR.glob("rayalign-weights-*")}


@pytest.fixture
def small_slots(monkeypatch):
    monkeypatch.setattr(weight_shm, "SLOT_BYTES", 4 << 10)  # 4 KiB: buckets of 8 KiB and more
    before = _leftovers()
    yield
    assert _leftovers() == before  # unlinked as soon as every member had it mapped


@pytest.mark.skipif(not weight_shm.SHM_DIR.is_dir(), reason="no /dev/shm here")
def test_buckets_go_through_shared_memory_in_chunks_sync_after_sync(small_slots):
    syncs = _syncs(3)
    transports, got = _run_group(syncs, shared_memory=True)
    assert transports == {0: "shm", 1: "shm", 2: "shm"}
    for rank, received in got.items():
        assert len(received) == 3
        for sent, arrived in zip(syncs, received):
            assert arrived.keys() == sent.keys()
            for name in sent:
                assert torch.equal(arrived[name], sent[name]), (rank, name)


def _failing_maps(monkeypatch, failing: set[int]):
    """Make the n-th call of weight_shm._map fail for n in ``failing`` (call 1 is the
    trainer's own; the receivers map after it, in whatever order their threads run)."""
    calls, real = [], weight_shm._map

    def flaky(path, nbytes):
        calls.append(path)
        if len(calls) in failing:
            raise OSError("no such file (another node)")
        return real(path, nbytes)
    monkeypatch.setattr(weight_shm, "_map", flaky)


def _all_arrived(syncs, got):
    for received in got.values():
        assert len(received) == len(syncs)
        for sent, arrived in zip(syncs, received):
            assert arrived.keys() == sent.keys()
            assert all(torch.equal(arrived[n], sent[n]) for n in sent)


@pytest.mark.skipif(not weight_shm.SHM_DIR.is_dir(), reason="no /dev/shm here")
def test_an_engine_that_cannot_map_the_slots_gets_its_chunks_over_the_socket(small_slots,
                                                                             monkeypatch):
    _failing_maps(monkeypatch, {2})   # one of the two receivers
    syncs = _syncs(3)
    transports, got = _run_group(syncs, shared_memory=True)
    assert transports[0] == "shm+gloo"
    assert sorted([transports[1], transports[2]]) == ["gloo", "shm"]
    _all_arrived(syncs, got)


@pytest.mark.parametrize("why", ["turned off", "no engine can map it"])
def test_the_group_broadcasts_over_gloo(small_slots, monkeypatch, why):
    if why == "no engine can map it":
        _failing_maps(monkeypatch, {2, 3})
    syncs = _syncs(2)
    transports, got = _run_group(syncs, shared_memory=why != "turned off")
    assert transports == {0: "gloo", 1: "gloo", 2: "gloo"}
    _all_arrived(syncs, got)


class _Group:
    """The one thing a channel asks of its gloo group outside the socket path: its size."""

    def size(self) -> int:
        return 2


def _receiver(trainer_pid: int, timeout_s: float) -> weight_shm.ShmChannel:
    """The engine side (rank 1) of a channel over slots in plain memory, whose trainer (rank
    0) is ``trainer_pid`` in this pid namespace and has posted nothing."""
    size = 1 << 10
    data = torch.zeros(weight_shm._file_bytes(size, 2), dtype=torch.uint8)
    slots = weight_shm.Slots(data, size)
    slots.sign(1)
    slots.pids[0], slots.ns[0] = trainer_pid, weight_shm._pid_namespace()
    return weight_shm.ShmChannel(_Group(), slots, [], rank=1, timeout_s=timeout_s)


def test_a_receiver_sees_its_trainer_process_end_without_waiting_out_the_timeout():
    import subprocess
    import time
    gone = subprocess.Popen(["true"])
    gone.wait()   # reaped: its pid names no process now
    channel = _receiver(gone.pid, timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"group rank 0 \\(pid {gone.pid}\\) ended while "
                                           f"this one waited for the trainer to post chunk 0"):
        channel.receive(torch.empty(100, dtype=torch.uint8))
    assert time.monotonic() - t0 < 2


def test_a_receiver_whose_trainer_lives_but_posts_nothing_stops_at_the_timeout():
    import os
    import time
    channel = _receiver(os.getpid(), timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="waited 0.5s for the trainer to post chunk 0"):
        channel.receive(torch.empty(100, dtype=torch.uint8))
    assert 0.5 <= time.monotonic() - t0 < 3
